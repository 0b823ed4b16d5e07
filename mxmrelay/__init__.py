"""mxmrelay: a transactional SMTP relay.

Customers submit over SMTP (587 STARTTLS, 465 implicit TLS, 25 STARTTLS
enforced); each accepted transaction is rewritten by the Maxemail rules and
forwarded as one send to the platform's delivery API.
"""

__version__ = "0.1.0"
