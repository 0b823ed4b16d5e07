"""The twistd plugin of the reference delivery API:
``twistd -n mxmrelay-refapi --config FILE``.

The relay's stand-in delivery API and its reports, in a process of their
own (see ``mxmrelay_refapi``).  Like the relay's plugin, it imports nothing
until twistd asks for the service, so ``twistd --help`` stays fast.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "The reference API's TOML configuration file (required)."],
    ]


@implementer(IServiceMaker, IPlugin)
class ReferenceAPIServiceMaker:
    tapname = "mxmrelay-refapi"
    description = "The reference delivery API and its reports (development, tests)."
    options = Options

    def makeService(self, options: Options) -> Any:
        from mxmrelay_refapi.service import service_from_options

        return service_from_options(options["config"])


serviceMaker = ReferenceAPIServiceMaker()
