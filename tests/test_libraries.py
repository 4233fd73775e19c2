"""Real bol client libraries from PyPI, unchanged but for their URLs, through the proxy.

Each library logs in itself (it cannot be told not to), with made-up credentials, at
the proxy's stand-in token endpoint, then calls the API through the proxy in front of
the imitation of bol, exactly as the demo runs them. The libraries are synchronous
(``requests``): they run in a worker thread while the proxy serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import bol.api
import bol.config
from bol.retailer.api import RetailerAPI

from proxy.demo import FakeBol

MADE_UP_SECRET = "any-secret-will-do"


async def test_python_bol_api_latest_logs_in_reads_orders_and_ships_one_through_the_proxy(
    demo: tuple[FakeBol, str],
) -> None:
    fake, base = demo
    logins = len(fake.token_requests)

    def tool() -> tuple[str, str, list[str], bool]:
        api = RetailerAPI(api_url=base, login_url=base)  # the only change: two URLs
        api.login("demo", MADE_UP_SECRET)
        orders = api.orders.list()
        order = api.orders.get(orders[0].orderId)
        item = order.orderItems[0].orderItemId
        process = api.orders.ship_order_item(item, "ref-1", transporter_code="TNT",
                                             track_and_trace="3SAOLD1234567")
        statuses = [process.status]
        while statuses[-1] == "PENDING" and len(statuses) < 5:
            statuses.append(api.process_status.getById(process.processStatusId).status)
        shipped = any(any(i.orderItemId == item for i in shipment.shipmentItems)
                      for shipment in api.shipments.list(order_id=order.orderId))
        return orders[0].orderId, order.orderId, statuses, shipped

    listed, got, statuses, shipped = await asyncio.to_thread(tool)
    assert listed == got
    assert statuses[0] == "PENDING" and statuses[-1] == "SUCCESS"  # polled to the end
    assert shipped  # the new shipment shows in the list once its process succeeded
    assert len(fake.token_requests) == logins  # the tool's login reached no bol
    assert [seen.method for seen in fake.api_requests][:3] == ["GET", "GET", "POST"]


@contextlib.contextmanager
def retailer_api_urls(base: str) -> Iterator[None]:
    """python-bol-retailer-api keeps its URLs in ``bol.config``, and caches tokens in its
    package folder by client id; both are put back afterwards."""
    saved = {name: getattr(bol.config, name) for name in
             ("AUTH_URL", "BASE_URL", "DEMO_URL", "SHARED_URL", "SHARED_DEMO_URL")}
    bol.config.AUTH_URL = base + "/token?grant_type=client_credentials"
    bol.config.BASE_URL = base + "/retailer"
    bol.config.SHARED_URL = base + "/shared"
    bol.config.CACHE.clear()
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(bol.config, name, value)
        bol.config.CACHE.clear()
        cache = Path(bol.config.__file__).parent / "cache" / "demo.txt"
        cache.unlink(missing_ok=True)


async def test_python_bol_retailer_api_logs_in_and_reads_orders_through_the_proxy(
    demo: tuple[FakeBol, str],
) -> None:
    fake, base = demo
    logins = len(fake.token_requests)

    def tool() -> tuple[str, str]:
        api = bol.api.BolAPI("demo", MADE_UP_SECRET)
        orders = api.orders.list().orders
        order = api.orders.get(orders[0].orderId)
        return orders[0].orderId, order.orderId

    with retailer_api_urls(base):
        listed, got = await asyncio.to_thread(tool)
    assert listed == got
    assert len(fake.token_requests) == logins
    assert fake.api_requests[-1].target == f"/retailer/orders/{listed}"
