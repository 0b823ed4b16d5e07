"""The twistd plugin: ``twistd -n mxmrelay --config FILE``.

This file ships in the wheel under ``twisted/plugins/`` (no
``__init__.py`` here: the folder belongs to Twisted).  It imports nothing
of mxmrelay until twistd asks for the service, so ``twistd --help`` stays
fast and a broken configuration is reported by the service, not the
plugin scan.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    optParameters = [
        ["config", "c", "/etc/mxmrelay/mxmrelay.toml", "The relay's TOML configuration file."],
    ]


@implementer(IServiceMaker, IPlugin)
class RelayServiceMaker:
    tapname = "mxmrelay"
    description = "Transactional SMTP relay forwarding to a delivery API."
    options = Options

    def makeService(self, options: Options) -> Any:
        from mxmrelay.run import service_from_options

        return service_from_options(options["config"])


serviceMaker = RelayServiceMaker()
