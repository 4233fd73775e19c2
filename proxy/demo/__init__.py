"""An imitation of bol.com for ``bol-proxy demo`` and for the tests: a sandbox to develop a
tool against.

    fake.py        FakeBol: login.bol.com and api.bol.com in one aiohttp application
    gateway.py     what bol does with an API request: route, method, budget, checks
    resources.py   the Retailer API operations: parameters in, bol-shaped answers out
    calls.py       what an operation receives: path parameters, query, body; paging
    shop.py        one run's state, and how writes change it
    processes.py   process statuses: PENDING, then SUCCESS or FAILURE, and the change
    catalogue.py   the made-up shop as it starts
    shapes.py      bol's date formats and the reduced forms lists show
    schemas.py     request bodies as bol's contract has them, and their violations
    limits.py      rate limits per client id and endpoint
    routes.py      path templates
    answers.py     media types, answers, bol's problem shape
    command.py     ``bol-proxy demo`` itself

Everything but fake.py and command.py is pure: no sockets, time passed in.
"""

from __future__ import annotations

from .answers import V10
from .catalogue import OFFER, ORDER
from .command import demo_config, run_demo, start_fake
from .fake import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, FakeBol, Seen
from .limits import ANY_ENDPOINT, DEFAULT_LIMITS

__all__ = [
    "ANY_ENDPOINT",
    "DEFAULT_LIMITS",
    "DEMO_CLIENT_ID",
    "DEMO_CLIENT_SECRET",
    "OFFER",
    "ORDER",
    "V10",
    "FakeBol",
    "Seen",
    "demo_config",
    "run_demo",
    "start_fake",
]
