"""The imitation of bol as a sandbox to develop a tool against.

Most tests talk to a served :class:`FakeBol` directly, as a tool with its own token would,
so that nothing the proxy does can hide what the imitation answers; its clock is the
test's :class:`FakeClock`, so budgets refill and writes settle when a test moves time. A
few go through the proxy, and the last ones run ``python -m proxy demo`` itself.

The answer shapes below are bol's Retailer API v10 contract written out: the fields it
requires, with their types.
"""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jsonschema
import pytest
from multidict import CIMultiDictProxy

from proxy.demo import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, OFFER, ORDER, V10, FakeBol, start_fake
from proxy.demo.answers import Problem
from proxy.demo.limits import RateLimits
from proxy.demo.processes import SETTLES_AFTER, Processes
from proxy.demo.routes import Routes
from tests.conftest import SECRET_B, FakeClock, StartProxy, base_config, free_port
from tests.test_cli import START, run, started

CSV = "application/vnd.retailer.v10+csv"
ADVERTISER = "application/vnd.advertiser.v10+json"
OFFER_ID = OFFER["offerId"]
ORDER_ID = ORDER["orderId"]
ITEM_ID = ORDER["orderItems"][0]["orderItemId"]
EAN = ORDER["orderItems"][0]["ean"]
NO_BODY = object()

# ------------------------------------------------------------------ bol's answer shapes

DATE_TIME = "date-time"


def shape(spec: Any) -> dict[str, Any]:
    """A JSON schema from a sketch: a dict's keys are all required, a list holds one
    sketch for its items, a Python type stands for the JSON type."""
    if spec == DATE_TIME:
        return {"type": "string", "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$"}
    if isinstance(spec, dict):
        return {"type": "object", "required": list(spec),
                "properties": {key: shape(value) for key, value in spec.items()}}
    if isinstance(spec, list):
        return {"type": "array", "items": shape(spec[0])}
    return {"type": {str: "string", int: "integer", float: "number", bool: "boolean"}[spec]}


ADDRESS = {"salutation": str, "firstName": str, "surname": str, "streetName": str,
           "houseNumber": str, "zipCode": str, "city": str, "countryCode": str}
REDUCED_ORDERS = {"orders": [{
    "orderId": str, "orderPlacedDateTime": DATE_TIME, "orderItems": [{
        "orderItemId": str, "ean": str, "fulfilmentMethod": str, "fulfilmentStatus": str,
        "quantity": int, "quantityShipped": int, "quantityCancelled": int,
        "cancellationRequest": bool, "latestChangedDateTime": DATE_TIME}]}]}
FULL_ORDER = {
    "orderId": str, "pickupPoint": bool, "orderPlacedDateTime": DATE_TIME,
    "shipmentDetails": ADDRESS, "billingDetails": {**ADDRESS, "email": str},
    "orderItems": [{
        "orderItemId": str, "cancellationRequest": bool,
        "fulfilment": {"method": str, "timeFrameType": str},
        "offer": {"offerId": str, "reference": str}, "product": {"ean": str, "title": str},
        "quantity": int, "quantityShipped": int, "quantityCancelled": int,
        "unitPrice": float, "totalPrice": float, "discounts": [{"title": str, "amount": float}],
        "commission": float, "latestChangedDateTime": DATE_TIME}]}
SHIPMENTS = {"shipments": [{
    "shipmentId": str, "shipmentDateTime": DATE_TIME, "shipmentReference": str,
    "order": {"orderId": str, "orderPlacedDateTime": DATE_TIME},
    "shipmentItems": [{"orderItemId": str, "ean": str}], "transport": {"transportId": str}}]}
SHIPMENT = {
    "shipmentId": str, "shipmentReference": str, "order": {"orderId": str},
    "shipmentItems": [{"orderItemId": str, "fulfilment": {"method": str},
                       "product": {"ean": str, "title": str}, "quantity": int,
                       "unitPrice": float}],
    "transport": {"transportId": str, "transporterCode": str}}
RETAILER_OFFER = {
    "offerId": str, "ean": str, "onHoldByRetailer": bool,
    "pricing": {"bundlePrices": [{"quantity": int, "unitPrice": float}]},
    "stock": {"amount": int, "correctedStock": int, "managedByRetailer": bool},
    "fulfilment": {"method": str}, "store": {"visible": [{"countryCode": str}]},
    "condition": {"name": str}, "notPublishableReasons": [{"code": str, "description": str}]}
PROCESS_STATUS = {"processStatusId": str, "entityId": str, "eventType": str,
                  "description": str, "status": str, "createTimestamp": DATE_TIME,
                  "links": [{"rel": str, "href": str}]}
INVENTORY = {"inventory": [{"ean": str, "bsku": str, "gradedStock": int, "regularStock": int,
                            "title": str}]}
INVOICES = {"invoiceListItems": [{"invoiceId": str, "invoiceType": str, "issueDate": str}]}
RETURN_REASON = {"mainReason": str, "customerComments": str}
PROCESSING = [{"quantity": int, "processingResult": str, "handlingResult": str,
               "processingDateTime": DATE_TIME}]
RETURNS = {"returns": [{
    "returnId": str, "registrationDateTime": DATE_TIME, "fulfilmentMethod": str,
    "returnItems": [{"rmaId": str, "orderId": str, "ean": str, "expectedQuantity": int,
                     "returnReason": RETURN_REASON, "handled": bool,
                     "processingResults": PROCESSING}]}]}
RETURN = {
    "returnId": str, "registrationDateTime": DATE_TIME, "fulfilmentMethod": str,
    "returnItems": [{"rmaId": str, "orderId": str, "ean": str, "title": str,
                     "expectedQuantity": int, "returnReason": RETURN_REASON, "handled": bool,
                     "processingResults": PROCESSING, "customerDetails": {"salutation": str}}]}
CATALOG_PRODUCT = {"published": bool, "gpc": {"chunkId": str},
                   "attributes": [{"id": str, "values": [{"value": str}]}],
                   "parties": [{"name": str, "type": str, "role": str}]}
COMMISSION = {"ean": str, "condition": str, "unitPrice": float, "fixedAmount": float,
              "percentage": float, "totalCost": float,
              "reductions": [{"maximumPrice": float, "costReduction": float, "startDate": str,
                              "endDate": str}]}
UPLOAD_REPORT = {"uploadId": str, "language": str, "status": str,
                 "attributes": [{"id": str, "values": [{"value": str}], "status": str}]}
PROBLEM = {"type": str, "title": str, "status": int, "detail": str}


def bol_shaped(body: Any, sketch: Any) -> None:
    jsonschema.validate(body, shape(sketch))


# ------------------------------------------------------------------------- the tool


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def problem(self) -> dict[str, Any]:
        """bol's problem document, checked for its shape."""
        assert self.headers["Content-Type"] == V10
        found: dict[str, Any] = self.json()
        bol_shaped(found, PROBLEM)
        assert found["type"] == "https://api.bol.com/problems"
        assert found["status"] == self.status
        return found

    def violations(self) -> dict[str, str]:
        return {v["name"]: v["reason"] for v in self.problem().get("violations", [])}


class Tool:
    """A tool calling the imitation of bol with a token of its client."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base
        self.token = ""

    async def login(self, client_id: str = DEMO_CLIENT_ID,
                    secret: str = DEMO_CLIENT_SECRET) -> Tool:
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        async with self.http.post(f"{self.base}/token", data="grant_type=client_credentials",
                                  headers={"Authorization": f"Basic {basic}"}) as resp:
            self.token = (await resp.json())["access_token"]
        return self

    async def __call__(self, method: str, path: str, body: Any = NO_BODY, *,
                       content_type: str | None = V10, raw: bytes | None = None,
                       accept: str = V10) -> Reply:
        headers = {"Authorization": f"Bearer {self.token}", "Accept": accept}
        if content_type is not None and method in ("POST", "PUT"):
            headers["Content-Type"] = content_type
        data = raw if raw is not None else (
            None if body is NO_BODY else json.dumps(body).encode())
        async with self.http.request(method, self.base + path, data=data,
                                     headers=headers) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def get(self, path: str, accept: str = V10) -> Any:
        """GET ``path``, which must answer 200 in bol's JSON."""
        reply = await self("GET", path, accept=accept)
        assert reply.status == 200, reply.body
        return reply.json()

    async def write(self, method: str, path: str, body: Any = NO_BODY) -> dict[str, Any]:
        """A write that bol must accept; its process status."""
        reply = await self(method, path, body)
        assert reply.status == 202, reply.body
        assert reply.headers["Content-Type"] == V10
        status: dict[str, Any] = reply.json()
        bol_shaped(status, PROCESS_STATUS)
        return status

    async def poll(self, status: dict[str, Any]) -> dict[str, Any]:
        polled: dict[str, Any] = await self.get(
            f"/shared/process-status/{status['processStatusId']}")
        bol_shaped(polled, PROCESS_STATUS)
        return polled

    async def settle(self, status: dict[str, Any]) -> dict[str, Any]:
        """Poll until the write's process has left PENDING (twice, in the imitation)."""
        assert (await self.poll(status))["status"] == "PENDING"
        return await self.poll(status)


@dataclass
class Sandbox:
    fake: FakeBol
    tool: Tool
    other: Tool  # a second client id
    clock: FakeClock


@pytest.fixture
async def sandbox(http: aiohttp.ClientSession, clock: FakeClock) -> AsyncIterator[Sandbox]:
    """A fresh imitation of bol on the test's clock, with bol's own budgets; its tokens
    outlast the fake time any test lets pass."""
    fake = FakeBol(clients={DEMO_CLIENT_ID: DEMO_CLIENT_SECRET, "client-b": SECRET_B},
                   ttl=86_400, clock=clock.wall)
    runner, url = await start_fake(fake)
    tool = await Tool(http, url).login()
    other = await Tool(http, url).login("client-b", SECRET_B)
    yield Sandbox(fake, tool, other, clock)
    await runner.cleanup()


# ----------------------------------------------------------------- pure: routes, budgets


def test_a_literal_path_segment_wins_over_a_parameter() -> None:
    routes = Routes(["/retailer/offers/{offer-id}", "/retailer/offers/export",
                     "/retailer/offers/export/{report-id}", "/retailer/offers/{offer-id}/stock"])
    export = routes.match("/retailer/offers/export")
    assert export is not None and export.templates == ("/retailer/offers/export",)
    offer = routes.match("/retailer-demo/offers/abc/stock")
    assert offer is not None and offer.root == "retailer-demo"
    assert offer.params("/retailer/offers/{offer-id}/stock") == {"offer-id": "abc"}
    assert routes.match("/retailer/offers/abc/price") is None
    assert routes.match("/retailer/offers/") is None


def test_templates_differing_only_in_parameter_names_are_one_resource() -> None:
    routes = Routes(["/retailer/returns/{return-id}", "/retailer/returns/{rma-id}"])
    match = routes.match("/retailer/returns/42")
    assert match is not None and len(match.templates) == 2
    assert match.params("/retailer/returns/{rma-id}") == {"rma-id": "42"}


def test_default_budgets_are_bols_numbers() -> None:
    limits = RateLimits()
    assert limits.limit(("GET", "/retailer/orders")) == (25, 60.0)
    assert limits.limit(("GET", "/retailer/orders/{order-id}")) == (25, 1.0)
    assert limits.limit(("POST", "/retailer/offers/export")) == (9, 3600.0)
    assert limits.limit(("GET", "/retailer/inventory")) == (50, 1.0)  # generous elsewhere


def test_the_ninth_offer_export_of_an_hour_is_the_last() -> None:
    limits = RateLimits()
    endpoint = ("POST", "/retailer/offers/export")
    budgets = [limits.spend("c", endpoint, 1000.0 + n) for n in range(9)]
    assert [b.remaining for b in budgets] == [8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert budgets[-1].reset == 3600 - 8
    with pytest.raises(Problem) as refused:
        limits.spend("c", endpoint, 1010.0)
    assert refused.value.status == 429
    assert limits.spend("c", endpoint, 4600.0).remaining == 8  # the hour is over


def test_a_process_settles_at_the_second_poll_or_after_a_few_seconds() -> None:
    processes = Processes()
    effects: list[float] = []

    def effect(at: float) -> None:
        effects.append(at)

    polled = processes.start("e1", "CREATE_OFFER", "one", 0.0, effect)
    waited = processes.start("e2", "CREATE_OFFER", "two", 0.0, effect)
    assert processes.poll(polled.process_id, 1.0) is polled and polled.status == "PENDING"
    assert processes.poll(polled.process_id, 2.0) is polled and polled.status == "SUCCESS"
    processes.settle_due(SETTLES_AFTER - 0.1)
    assert waited.status == "PENDING"
    processes.settle_due(SETTLES_AFTER)
    assert waited.status == "SUCCESS"
    assert effects == [2.0, SETTLES_AFTER]  # each change made once, when it settled
    assert processes.poll("999", 3.0) is None


# ---------------------------------------------------------------- methods and resources


@pytest.mark.parametrize(("method", "path", "allow"), [
    ("PUT", "/retailer/orders", "GET, HEAD"),
    ("POST", f"/retailer/offers/{OFFER_ID}", "DELETE, GET, HEAD, PUT"),
    ("DELETE", f"/retailer/orders/{ORDER_ID}", "GET, HEAD"),
    ("GET", "/retailer/orders/cancellation", "PUT"),
    ("PATCH", "/retailer/returns/31234567", "GET, HEAD, PUT"),
    ("PUT", "/shared-demo/process-status", "GET, HEAD, POST"),
])
async def test_a_known_path_with_a_method_it_lacks_is_405_not_another_methods_answer(
    sandbox: Sandbox, method: str, path: str, allow: str
) -> None:
    reply = await sandbox.tool(method, path, {"amount": 3, "managedByRetailer": False})
    assert reply.status == 405
    assert reply.headers["Allow"] == allow
    assert reply.problem()["title"] == "Method Not Allowed"
    assert "orders" not in reply.json() and "orderId" not in reply.json()


async def test_an_unknown_path_is_404(sandbox: Sandbox) -> None:
    reply = await sandbox.tool("GET", "/retailer/nothing-here")
    assert reply.status == 404
    assert reply.problem()["title"] == "Not Found"


async def test_head_answers_like_get_without_a_body(sandbox: Sandbox) -> None:
    reply = await sandbox.tool("HEAD", "/retailer/orders")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == V10
    assert reply.body == b""


LISTS = [
    ("/retailer/orders", REDUCED_ORDERS),
    ("/retailer/orders?status=ALL&fulfilment-method=ALL", REDUCED_ORDERS),
    ("/retailer/shipments", SHIPMENTS),
    ("/retailer/inventory", INVENTORY),
    ("/retailer/invoices", INVOICES),
    ("/retailer/returns", RETURNS),
    ("/retailer-demo/orders", REDUCED_ORDERS),
]


@pytest.mark.parametrize(("path", "sketch"), LISTS, ids=[p for p, _ in LISTS])
async def test_each_list_answers_bol_shaped_json_in_v10(
    sandbox: Sandbox, path: str, sketch: Any
) -> None:
    reply = await sandbox.tool("GET", path)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == V10
    bol_shaped(reply.json(), sketch)
    assert reply.json()[next(iter(sketch))]  # the demo's shop is not empty


DETAILS = [  # a list, the field of its entries that identifies them, the detail, its shape
    ("/retailer/orders", "orders", "orderId", "/retailer/orders/{}", FULL_ORDER),
    ("/retailer/shipments", "shipments", "shipmentId", "/retailer/shipments/{}", SHIPMENT),
    ("/retailer/returns", "returns", "returnId", "/retailer/returns/{}", RETURN),
    ("/retailer/invoices", "invoiceListItems", "invoiceId", "/retailer/invoices/{}",
     {"invoiceId": str, "invoicePeriod": {"startDate": str, "endDate": str}}),
]


@pytest.mark.parametrize(("listing", "key", "field", "detail", "sketch"), DETAILS,
                         ids=[d[3] for d in DETAILS])
async def test_each_entry_of_a_list_can_be_fetched_bol_shaped_by_its_id(
    sandbox: Sandbox, listing: str, key: str, field: str, detail: str, sketch: Any
) -> None:
    first = (await sandbox.tool.get(listing))[key][0]
    reply = await sandbox.tool("GET", detail.format(first[field]))
    assert reply.status == 200
    assert reply.headers["Content-Type"] == V10
    bol_shaped(reply.json(), sketch)
    assert reply.json()[field] == first[field]


SINGLES = [
    (f"/retailer/offers/{OFFER_ID}", RETAILER_OFFER),
    (f"/retailer/content/catalog-products/{EAN}", CATALOG_PRODUCT),
    (f"/retailer/commission/{EAN}?unit-price=9.99", COMMISSION),
    (f"/retailer/commission/{EAN}?unit-price=20&condition=GOOD", COMMISSION),
]


@pytest.mark.parametrize(("path", "sketch"), SINGLES, ids=[p for p, _ in SINGLES])
async def test_each_single_resource_answers_bol_shaped_json_in_v10(
    sandbox: Sandbox, path: str, sketch: Any
) -> None:
    reply = await sandbox.tool("GET", path)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == V10
    bol_shaped(reply.json(), sketch)


async def test_the_offer_of_the_constant_is_the_offer_the_shop_holds(sandbox: Sandbox) -> None:
    assert await sandbox.tool.get(f"/retailer/offers/{OFFER_ID}") == OFFER
    assert (await sandbox.tool.get("/retailer/orders"))["orders"][0] == ORDER


async def test_a_commission_is_the_fixed_amount_plus_the_percentage(sandbox: Sandbox) -> None:
    one = await sandbox.tool.get(f"/retailer/commission/{EAN}?unit-price=20")
    assert one["totalCost"] == round(one["fixedAmount"] + 20 * one["percentage"] / 100, 2)
    reply = await sandbox.tool("POST", "/retailer/commission", {"commissionQueries": [
        {"ean": EAN, "unitPrice": 20}, {"ean": "0000000000000", "unitPrice": 5}]})
    assert reply.status == 200
    bol_shaped(reply.json(), {"commissions": [COMMISSION]})
    assert reply.json()["commissions"] == [one]  # an EAN bol does not sell is left out


# ------------------------------------------------------------------ lists: pages, filters


async def test_orders_come_fifty_to_a_page_and_a_page_past_the_end_is_an_empty_object(
    sandbox: Sandbox,
) -> None:
    first = (await sandbox.tool.get("/retailer/orders"))["orders"]
    second = (await sandbox.tool.get("/retailer/orders?page=2"))["orders"]
    assert len(first) == 50
    assert 0 < len(second) < 50
    assert not {o["orderId"] for o in first} & {o["orderId"] for o in second}
    assert await sandbox.tool.get("/retailer/orders?page=3") == {}  # as bol answers


async def test_orders_default_to_open_ones_fulfilled_by_the_retailer(sandbox: Sandbox) -> None:
    def items(answer: dict[str, Any]) -> list[dict[str, Any]]:
        return [i for order in answer.get("orders", []) for i in order["orderItems"]]

    default = items(await sandbox.tool.get("/retailer/orders"))
    assert {(i["fulfilmentMethod"], i["fulfilmentStatus"]) for i in default} == {("FBR", "OPEN")}
    fbb = items(await sandbox.tool.get("/retailer/orders?fulfilment-method=FBB&status=ALL"))
    assert fbb and {i["fulfilmentMethod"] for i in fbb} == {"FBB"}
    shipped = items(await sandbox.tool.get("/retailer/orders?status=SHIPPED"))
    assert shipped and all(i["quantityShipped"] == i["quantity"] for i in shipped)
    on_day = items(await sandbox.tool.get("/retailer/orders?latest-change-date=2026-11-27"))
    assert on_day and all(i["latestChangedDateTime"].startswith("2026-11-27") for i in on_day)


async def test_change_interval_lists_the_orders_changed_in_the_last_minutes(
    sandbox: Sandbox,
) -> None:
    recent = "/retailer/orders?change-interval-minute=10&status=ALL"
    assert await sandbox.tool.get(recent) == {}  # the catalogue's orders are days old
    await sandbox.tool.settle(await sandbox.tool.write(
        "PUT", "/retailer/orders/cancellation",
        {"orderItems": [{"orderItemId": ITEM_ID, "reasonCode": "OUT_OF_STOCK"}]}))
    changed = (await sandbox.tool.get(recent))["orders"]
    assert [o["orderId"] for o in changed] == [ORDER_ID]
    await sandbox.clock.advance(11 * 60)
    assert await sandbox.tool.get(recent) == {}


async def test_shipments_filter_by_order_and_by_fulfilment_method(sandbox: Sandbox) -> None:
    fbr = (await sandbox.tool.get("/retailer/shipments"))["shipments"]
    fbb = (await sandbox.tool.get("/retailer/shipments?fulfilment-method=FBB"))["shipments"]
    assert fbr and fbb and not {s["shipmentId"] for s in fbr} & {s["shipmentId"] for s in fbb}
    one = fbb[0]["order"]["orderId"]
    by_order = (await sandbox.tool.get(f"/retailer/shipments?order-id={one}"))["shipments"]
    assert [s["order"]["orderId"] for s in by_order] == [one]
    assert await sandbox.tool.get("/retailer/shipments?page=2") == {}


async def test_returns_filter_on_handled(sandbox: Sandbox) -> None:
    handled = (await sandbox.tool.get("/retailer/returns?handled=true"))["returns"]
    open_ = (await sandbox.tool.get("/retailer/returns?handled=False"))["returns"]  # any case
    assert handled and open_
    assert all(i["handled"] for r in handled for i in r["returnItems"])
    assert not any(i["handled"] for r in open_ for i in r["returnItems"])


async def test_invoices_filter_on_their_period(sandbox: Sandbox) -> None:
    october = await sandbox.tool.get(
        "/retailer/invoices?period-start-date=2026-10-05&period-end-date=2026-10-20")
    assert [i["invoicePeriod"]["startDate"] for i in october["invoiceListItems"]] == [
        "2026-10-01"]
    reply = await sandbox.tool(
        "GET", "/retailer/invoices?period-start-date=2026-01-01&period-end-date=2026-10-20")
    assert reply.status == 400
    assert "period-end-date" in reply.violations()  # bol allows a month at most


async def test_inventory_filters_on_stock_and_query(sandbox: Sandbox) -> None:
    everything = (await sandbox.tool.get("/retailer/inventory"))["inventory"]
    low = (await sandbox.tool.get("/retailer/inventory?stock=INSUFFICIENT"))["inventory"]
    assert low and len(low) < len(everything)
    title = everything[0]["title"]
    found = (await sandbox.tool.get(f"/retailer/inventory?query={title.split()[0]}"))
    assert [e["title"] for e in found["inventory"]] == [title]


@pytest.mark.parametrize(("query", "named"), [
    ("status=SOLD", "status"), ("fulfilment-method=fbr", "fulfilment-method"),
    ("page=0", "page"), ("page=two", "page"), ("change-interval-minute=61",
                                                "change-interval-minute"),
    ("latest-change-date=27-11-2026", "latest-change-date"),
    ("vvb-only=maybe", "vvb-only"),
])
async def test_a_bad_query_parameter_is_400_naming_it(
    sandbox: Sandbox, query: str, named: str
) -> None:
    reply = await sandbox.tool("GET", f"/retailer/orders?{query}")
    assert reply.status == 400
    assert named in reply.violations()


async def test_a_commission_without_its_price_is_400_naming_the_parameter(
    sandbox: Sandbox,
) -> None:
    reply = await sandbox.tool("GET", f"/retailer/commission/{EAN}")
    assert reply.status == 400
    assert "unit-price" in reply.violations()


# ----------------------------------------------------------------------- unknown ids


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/retailer/orders/1", NO_BODY),
    ("GET", "/retailer/shipments/1", NO_BODY),
    ("GET", "/retailer/offers/no-such-offer", NO_BODY),
    ("PUT", "/retailer/offers/no-such-offer/stock", {"amount": 1, "managedByRetailer": False}),
    ("PUT", "/retailer/offers/no-such-offer", {"fulfilment": {"method": "FBR"}}),
    ("DELETE", "/retailer/offers/no-such-offer", NO_BODY),
    ("GET", "/retailer/offers/export/no-such-report", NO_BODY),
    ("GET", "/retailer/invoices/1", NO_BODY),
    ("GET", "/retailer/returns/1", NO_BODY),
    ("PUT", "/retailer/returns/1", {"handlingResult": "RETURN_RECEIVED", "quantityReturned": 1}),
    ("GET", "/retailer/content/catalog-products/0000000000000", NO_BODY),
    ("GET", "/retailer/content/upload-report/no-such-upload", NO_BODY),
    ("GET", "/retailer/commission/0000000000000?unit-price=5", NO_BODY),
    ("GET", "/shared/process-status/1", NO_BODY),
])
async def test_an_unknown_id_is_a_404_problem(
    sandbox: Sandbox, method: str, path: str, body: Any
) -> None:
    reply = await sandbox.tool(method, path, body)
    assert reply.status == 404
    assert reply.problem()["title"] == "Not Found"
    assert "X-RateLimit-Remaining" in reply.headers  # bol counts it like any answer


# ---------------------------------------------------------- media types and bodies


STOCK = f"/retailer/offers/{OFFER_ID}/stock"
STOCK_BODY = {"amount": 3, "managedByRetailer": False}


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain",
                                          "application/vnd.retailer.v9+json"])
async def test_a_write_without_bols_content_type_is_400_and_changes_nothing(
    sandbox: Sandbox, content_type: str | None
) -> None:
    reply = await sandbox.tool("PUT", STOCK, STOCK_BODY, content_type=content_type)
    assert reply.status == 400
    assert "Content-Type" in reply.violations()
    await sandbox.clock.advance(SETTLES_AFTER)
    assert (await sandbox.tool.get(f"/retailer/offers/{OFFER_ID}"))["stock"] == OFFER["stock"]


async def test_a_post_without_body_still_needs_its_content_type(sandbox: Sandbox) -> None:
    bare = await sandbox.tool("POST", "/retailer/offers/export", content_type=None)
    assert bare.status == 400
    assert list(bare.violations()) == ["Content-Type"]
    typed = await sandbox.tool("POST", "/retailer/offers/export")
    assert typed.status == 400
    assert list(typed.violations()) == ["body"]  # past the media type: the body is missing


async def test_bols_content_type_with_parameters_is_accepted(sandbox: Sandbox) -> None:
    reply = await sandbox.tool("PUT", STOCK, STOCK_BODY, content_type=V10 + ";charset=UTF-8")
    assert reply.status == 202


async def test_a_delete_needs_no_content_type(sandbox: Sandbox) -> None:
    reply = await sandbox.tool("DELETE", f"/retailer/offers/{OFFER_ID}", content_type=None)
    assert reply.status == 202


@pytest.mark.parametrize("raw", [b'{"amount": 3,', b"amount=3", b'{"amount": 3}\xff',
                                 b"\xff\xfe"], ids=["cut-off", "form", "trailing", "binary"])
async def test_a_malformed_json_body_is_400_with_a_violation(
    sandbox: Sandbox, raw: bytes
) -> None:
    reply = await sandbox.tool("PUT", STOCK, raw=raw)
    assert reply.status == 400
    assert reply.problem()["detail"] == "Malformed JSON body"
    assert reply.violations()["body"].startswith("Malformed JSON")


async def test_a_body_breaking_bols_contract_lists_every_violation_by_its_path(
    sandbox: Sandbox,
) -> None:
    reply = await sandbox.tool("POST", "/retailer/offers", {
        "ean": EAN, "condition": {"name": "USED"},
        "pricing": {"bundlePrices": [{"quantity": 1, "unitPrice": 0.5}]},
        "stock": {"amount": 1000, "managedByRetailer": "no"}})
    assert reply.status == 400
    found = reply.violations()
    assert set(found) == {"condition.name", "pricing.bundlePrices[0].unitPrice", "stock.amount",
                          "stock.managedByRetailer", "fulfilment"}
    assert found["condition.name"].startswith("Request contains invalid value(s): 'USED'")
    assert found["fulfilment"] == "Field is required."


# ------------------------------------------------- writes: process status, then the change


async def cancelled(tool: Tool, status: dict[str, Any]) -> None:
    (item,) = (await tool.get(f"/retailer/orders/{ORDER_ID}"))["orderItems"]
    assert item["quantityCancelled"] == item["quantity"]
    open_ids = {o["orderId"] for o in (await tool.get("/retailer/orders"))["orders"]}
    assert ORDER_ID not in open_ids


async def shipped(tool: Tool, status: dict[str, Any]) -> None:
    listed = (await tool.get(f"/retailer/shipments?order-id={ORDER_ID}")).get("shipments", [])
    assert len(listed) == 1
    found = listed[0]
    assert (await tool.get("/retailer/shipments"))["shipments"][0] == found  # newest first
    full = await tool.get(f"/retailer/shipments/{found['shipmentId']}")
    bol_shaped(full, SHIPMENT)
    assert full["transport"]["trackAndTrace"] == "3SBOL0000000001"
    (item,) = (await tool.get(f"/retailer/orders/{ORDER_ID}"))["orderItems"]
    assert item["quantityShipped"] == 1


async def offered(tool: Tool, status: dict[str, Any]) -> None:
    offer = await tool.get(f"/retailer/offers/{status['entityId']}")
    bol_shaped(offer, RETAILER_OFFER)
    assert (offer["ean"], offer["condition"]["name"]) == (EAN, "AS_NEW")


async def updated(tool: Tool, status: dict[str, Any]) -> None:
    offer = await tool.get(f"/retailer/offers/{OFFER_ID}")
    assert (offer["reference"], offer["fulfilment"]["deliveryCode"]) == ("NEW-REF", "1-2d")


async def repriced(tool: Tool, status: dict[str, Any]) -> None:
    offer = await tool.get(f"/retailer/offers/{OFFER_ID}")
    assert offer["pricing"]["bundlePrices"] == [{"quantity": 1, "unitPrice": 8.49}]


async def restocked(tool: Tool, status: dict[str, Any]) -> None:
    stock = (await tool.get(f"/retailer/offers/{OFFER_ID}"))["stock"]
    assert stock["amount"] == 99
    assert stock["correctedStock"] == 99 - (OFFER["stock"]["amount"]
                                            - OFFER["stock"]["correctedStock"])


async def deleted(tool: Tool, status: dict[str, Any]) -> None:
    assert (await tool("GET", f"/retailer/offers/{OFFER_ID}")).status == 404


async def exported(tool: Tool, status: dict[str, Any]) -> None:
    reply = await tool("GET", f"/retailer/offers/export/{status['entityId']}", accept=CSV)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == CSV
    header, *rows = reply.body.decode().splitlines()
    assert header.startswith("offerId,ean,")
    assert any(row.startswith(f"{OFFER_ID},{EAN},") for row in rows)


async def handled(tool: Tool, status: dict[str, Any]) -> None:
    returns = (await tool.get("/retailer/returns?handled=true")).get("returns", [])
    items = [i for r in returns for i in r["returnItems"] if i["rmaId"] == "31234567"]
    assert len(items) == 1
    assert items[0]["processingResults"][-1]["handlingResult"] == "EXCHANGE_PRODUCT"


async def published(tool: Tool, status: dict[str, Any]) -> None:
    report = await tool.get(f"/retailer/content/upload-report/{status['entityId']}")
    bol_shaped(report, UPLOAD_REPORT)
    assert report["status"] == "COMPLETED"
    assert {a["status"] for a in report["attributes"]} == {"PUBLISHED"}
    product = await tool.get(f"/retailer/content/catalog-products/{EAN}")
    assert {"id": "Colour", "values": [{"value": "Blue"}]} in product["attributes"]


WRITES: list[tuple[str, str, Any, str, Callable[[Tool, dict[str, Any]], Awaitable[None]]]] = [
    ("PUT", "/retailer/orders/cancellation",
     {"orderItems": [{"orderItemId": ITEM_ID, "reasonCode": "OUT_OF_STOCK"}]},
     "CANCEL_ORDER", cancelled),
    ("POST", "/retailer/shipments",
     {"orderItems": [{"orderItemId": ITEM_ID}], "shipmentReference": "MY-REF",
      "transport": {"transporterCode": "TNT", "trackAndTrace": "3SBOL0000000001"}},
     "CREATE_SHIPMENT", shipped),
    ("POST", "/retailer/offers",
     {"ean": EAN, "condition": {"name": "AS_NEW"}, "reference": "SECOND-HAND",
      "pricing": {"bundlePrices": [{"quantity": 1, "unitPrice": 7.5}]},
      "stock": {"amount": 2, "managedByRetailer": False},
      "fulfilment": {"method": "FBR", "deliveryCode": "1-2d"}}, "CREATE_OFFER", offered),
    ("PUT", f"/retailer/offers/{OFFER_ID}",
     {"reference": "NEW-REF", "fulfilment": {"method": "FBR", "deliveryCode": "1-2d"}},
     "UPDATE_OFFER", updated),
    ("PUT", f"/retailer/offers/{OFFER_ID}/price",
     {"pricing": {"bundlePrices": [{"quantity": 1, "unitPrice": 8.49}]}},
     "UPDATE_OFFER_PRICE", repriced),
    ("PUT", f"/retailer/offers/{OFFER_ID}/stock", {"amount": 99, "managedByRetailer": False},
     "UPDATE_OFFER_STOCK", restocked),
    ("DELETE", f"/retailer/offers/{OFFER_ID}", NO_BODY, "DELETE_OFFER", deleted),
    ("POST", "/retailer/offers/export", {"format": "CSV"}, "CREATE_OFFER_EXPORT", exported),
    ("PUT", "/retailer/returns/31234567",
     {"handlingResult": "EXCHANGE_PRODUCT", "quantityReturned": 1}, "HANDLE_RETURN_ITEM",
     handled),
    ("POST", "/retailer/content/products",
     {"language": "nl", "attributes": [{"id": "EAN", "values": [{"value": EAN}]},
                                       {"id": "Colour", "values": [{"value": "Blue"}]}]},
     "CREATE_PRODUCT_CONTENT", published),
]


@pytest.mark.parametrize(("method", "path", "body", "event", "shows"), WRITES,
                         ids=[w[3] for w in WRITES])
async def test_a_write_is_accepted_pending_then_succeeds_at_the_second_poll_and_shows(
    sandbox: Sandbox, method: str, path: str, body: Any, event: str,
    shows: Callable[[Tool, dict[str, Any]], Awaitable[None]],
) -> None:
    status = await sandbox.tool.write(method, path, body)
    assert (status["eventType"], status["status"]) == (event, "PENDING")
    assert status["links"][0]["href"].endswith(
        f"/shared/process-status/{status['processStatusId']}")
    first = await sandbox.tool.poll(status)
    assert first["status"] == "PENDING"
    with pytest.raises(AssertionError):  # nothing has changed yet
        await shows(sandbox.tool, status)
    second = await sandbox.tool.poll(status)
    assert second["status"] == "SUCCESS"
    assert "errorMessage" not in second
    await shows(sandbox.tool, status)
    assert (await sandbox.tool.poll(status))["status"] == "SUCCESS"  # and stays so


async def test_a_write_nobody_polls_takes_effect_after_a_few_seconds(sandbox: Sandbox) -> None:
    await sandbox.tool.write("PUT", STOCK, {"amount": 99, "managedByRetailer": False})
    await sandbox.clock.advance(SETTLES_AFTER - 1)
    assert (await sandbox.tool.get(f"/retailer/offers/{OFFER_ID}"))["stock"]["amount"] != 99
    await sandbox.clock.advance(1)
    await restocked(sandbox.tool, {})


@pytest.mark.parametrize(("path", "body", "error"), [
    ("/retailer/shipments", {"orderItems": [{"orderItemId": "1"}]}, "does not exist"),
    ("/retailer/shipments", {"orderItems": [{"orderItemId": ITEM_ID, "quantity": 5}]},
     "left to ship"),
    ("/retailer/orders/cancellation",
     {"orderItems": [{"orderItemId": "1", "reasonCode": "OTHER"}]}, "does not exist"),
    ("/retailer/returns/31234569", {"handlingResult": "RETURN_RECEIVED", "quantityReturned": 1},
     "already handled"),
    ("/retailer/content/products",
     {"language": "nl", "attributes": [{"id": "Colour", "values": [{"value": "Red"}]}]},
     "EAN"),
], ids=["unknown-item", "too-many", "cancel-unknown", "handled-twice", "content-without-ean"])
async def test_a_write_bol_cannot_carry_out_ends_in_failure_with_an_error_message(
    sandbox: Sandbox, path: str, body: Any, error: str
) -> None:
    method = "POST" if path.endswith(("shipments", "products")) else "PUT"
    status = await sandbox.tool.write(method, path, body)
    settled = await sandbox.tool.settle(status)
    assert settled["status"] == "FAILURE"
    assert error in settled["errorMessage"]


async def test_cancelling_an_item_twice_fails_the_second_time(sandbox: Sandbox) -> None:
    body = {"orderItems": [{"orderItemId": ITEM_ID, "reasonCode": "OUT_OF_STOCK"}]}
    first = await sandbox.tool.settle(await sandbox.tool.write(
        "PUT", "/retailer/orders/cancellation", body))
    second = await sandbox.tool.settle(await sandbox.tool.write(
        "PUT", "/retailer/orders/cancellation", body))
    assert (first["status"], second["status"]) == ("SUCCESS", "FAILURE")
    assert "already handled" in second["errorMessage"]


async def test_the_export_report_is_404_until_its_process_succeeds(sandbox: Sandbox) -> None:
    status = await sandbox.tool.write("POST", "/retailer/offers/export", {"format": "CSV"})
    report = f"/retailer/offers/export/{status['entityId']}"
    assert (await sandbox.tool("GET", report, accept=CSV)).status == 404
    await sandbox.tool.settle(status)
    assert (await sandbox.tool("GET", report, accept=CSV)).status == 200


async def test_process_statuses_can_be_asked_for_in_bulk_and_by_entity(
    sandbox: Sandbox,
) -> None:
    status = await sandbox.tool.write("PUT", STOCK, STOCK_BODY)
    reply = await sandbox.tool("POST", "/shared/process-status", {"processStatusQueries": [
        {"processStatusId": status["processStatusId"]}, {"processStatusId": "1"}]})
    assert reply.status == 200
    bol_shaped(reply.json(), {"processStatuses": [PROCESS_STATUS]})
    assert [p["status"] for p in reply.json()["processStatuses"]] == ["PENDING"]  # 1 left out
    found = await sandbox.tool.get(
        f"/shared/process-status?entity-id={OFFER_ID}&event-type=UPDATE_OFFER_STOCK")
    assert [p["status"] for p in found["processStatuses"]] == ["SUCCESS"]  # the second poll
    missing = await sandbox.tool("GET", "/shared/process-status?event-type=NOPE")
    assert set(missing.violations()) == {"entity-id", "event-type"}


async def test_the_shared_api_answers_in_the_advertiser_media_type_when_asked(
    sandbox: Sandbox,
) -> None:
    status = await sandbox.tool.write("PUT", STOCK, STOCK_BODY)
    reply = await sandbox.tool("GET", f"/shared/process-status/{status['processStatusId']}",
                               accept=ADVERTISER)
    assert reply.status == 200
    assert reply.headers["Content-Type"] == ADVERTISER


async def test_writes_under_the_demo_roots_are_polled_under_the_demo_root(
    sandbox: Sandbox,
) -> None:
    status = await sandbox.tool.write("PUT", f"/retailer-demo/offers/{OFFER_ID}/stock",
                                      STOCK_BODY)
    href = status["links"][0]["href"]
    assert href.endswith(f"/shared-demo/process-status/{status['processStatusId']}")
    assert (await sandbox.tool.get(href.removeprefix(sandbox.tool.base)))["status"] == "PENDING"


async def test_each_run_keeps_its_own_shop(sandbox: Sandbox, http: aiohttp.ClientSession
                                           ) -> None:
    await sandbox.tool.settle(await sandbox.tool.write(
        "DELETE", f"/retailer/offers/{OFFER_ID}"))
    another = FakeBol()
    runner, url = await start_fake(another)
    try:
        tool = await Tool(http, url).login()
        assert await tool.get(f"/retailer/offers/{OFFER_ID}") == OFFER
    finally:
        await runner.cleanup()


# -------------------------------------------------------------------------- budgets


async def test_rate_limit_headers_count_down_per_client_and_endpoint(sandbox: Sandbox) -> None:
    sandbox.fake.limits[("GET", "/retailer/orders")] = (3, 10.0)
    seen = []
    for _ in range(3):
        reply = await sandbox.tool("GET", "/retailer/orders")
        seen.append((reply.headers["X-RateLimit-Limit"], reply.headers["X-RateLimit-Remaining"],
                     reply.headers["X-RateLimit-Reset"]))
    assert seen == [("3", "2", "10"), ("3", "1", "10"), ("3", "0", "10")]
    other_client = await sandbox.other("GET", "/retailer/orders")
    assert other_client.headers["X-RateLimit-Remaining"] == "2"
    other_endpoint = await sandbox.tool("GET", f"/retailer/orders/{ORDER_ID}")
    assert other_endpoint.headers["X-RateLimit-Limit"] == "25"
    demo_root = await sandbox.tool("GET", "/retailer-demo/orders")  # the same endpoint
    assert demo_root.status == 429


async def test_a_spent_budget_is_429_with_retry_after_and_bols_body_and_reaches_nothing(
    sandbox: Sandbox,
) -> None:
    sandbox.fake.limits[("PUT", "/retailer/offers/{offer-id}/stock")] = (1, 10.0)
    assert (await sandbox.tool("PUT", STOCK, STOCK_BODY)).status == 202
    await sandbox.clock.advance(3.5)
    reply = await sandbox.tool("PUT", STOCK, {"amount": 42, "managedByRetailer": False})
    assert reply.status == 429
    assert reply.headers["Retry-After"] == "7"  # 6.5 s left, rounded up
    assert reply.headers["X-RateLimit-Remaining"] == "0"
    assert reply.json() == {"type": "https://api.bol.com/problems",
                            "title": "Too Many Requests", "status": 429,
                            "detail": "Too many requests, retry in 7 seconds."}
    await sandbox.clock.advance(SETTLES_AFTER)
    assert (await sandbox.tool.get(f"/retailer/offers/{OFFER_ID}"))["stock"]["amount"] == 3


async def test_a_budget_refills_when_its_reset_has_passed(sandbox: Sandbox) -> None:
    sandbox.fake.limits[("GET", "/retailer/orders")] = (2, 60.0)
    for _ in range(2):
        assert (await sandbox.tool("GET", "/retailer/orders")).status == 200
    await sandbox.clock.advance(59)
    refused = await sandbox.tool("GET", "/retailer/orders")
    assert (refused.status, refused.headers["Retry-After"]) == (429, "1")
    await sandbox.clock.advance(1)
    again = await sandbox.tool("GET", "/retailer/orders")
    assert again.status == 200
    assert (again.headers["X-RateLimit-Remaining"], again.headers["X-RateLimit-Reset"]) == (
        "1", "60")


async def test_bols_order_list_budget_is_spent_after_25_a_minute(sandbox: Sandbox) -> None:
    statuses = [(await sandbox.tool("GET", "/retailer/orders")).status for _ in range(26)]
    assert statuses == [200] * 25 + [429]


# ------------------------------------------------------------------- through the proxy


async def test_a_tool_behind_the_proxy_sees_bols_answers_and_budgets(
    http: aiohttp.ClientSession, clock: FakeClock, start_proxy: StartProxy
) -> None:
    fake = FakeBol(clients={DEMO_CLIENT_ID: DEMO_CLIENT_SECRET, "client-b": SECRET_B},
                   clock=clock.wall)
    runner, url = await start_fake(fake)
    try:
        server = await start_proxy(base_config(url), clock=clock)
        base = f"http://127.0.0.1:{server.port()}"
        async with http.get(f"{base}/retailer/orders/{ORDER_ID}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == V10
            assert resp.headers["X-RateLimit-Limit"] == "25"
            bol_shaped(json.loads(await resp.read()), FULL_ORDER)
        async with http.put(f"{base}{STOCK}", data=json.dumps(STOCK_BODY),
                            headers={"Content-Type": V10}) as resp:
            assert resp.status == 202
            bol_shaped(json.loads(await resp.read()), PROCESS_STATUS)
        async with http.put(f"{base}/retailer/orders") as resp:
            assert resp.status == 405
    finally:
        await runner.cleanup()


# -------------------------------------------------------------- the demo command (e2e)


@pytest.mark.e2e
@pytest.mark.timeout(20)
async def test_demo_serves_bol_on_the_bol_port_and_prints_lines_to_paste(
    http: aiohttp.ClientSession,
) -> None:
    port, bol_port = free_port(), free_port()
    async with started("demo", "--port", str(port), "--bol-port", str(bol_port)) as demo:
        heading = await demo.line("stdout", r"imitation of bol.com at (\S+), proxy at (\S+)",
                                  START)
        assert heading.groups() == (f"http://127.0.0.1:{bol_port}", f"http://127.0.0.1:{port}")
        curl = await demo.line("stdout", r"^  curl ")
        # The answer is JSON without a final newline: the example adds one for the shell.
        assert "-w '\\n'" in curl.string
        api = await demo.line("stdout", r"RetailerAPI\(api_url=\"(\S+)\", login_url=\"(\S+)\"\)")
        assert api.groups() == (f"http://127.0.0.1:{port}",) * 2  # both at the proxy
        login = await demo.line("stdout", r"api\.login\(client_id=\"(\w+)\"")
        assert login.group(1) == "demo"
        upstream = await demo.line("stdout", r"upstream: \{api_url: \"(\S+)\", token_url")
        assert upstream.group(1) == f"http://127.0.0.1:{bol_port}"
        await demo.line("stdout", r"Ctrl-C stops")

        tool = await Tool(http, f"http://127.0.0.1:{bol_port}").login()  # bol, directly
        assert (await tool.get(f"/retailer/orders/{ORDER_ID}"))["orderId"] == ORDER_ID
        async with http.get(f"http://127.0.0.1:{port}/retailer/offers/{OFFER_ID}") as resp:
            assert resp.status == 200  # and through the proxy
        demo.send(signal.SIGINT)
        assert (await demo.finish()).status == 0


@pytest.mark.e2e
async def test_demo_help_names_both_ports() -> None:
    done = await run("demo", "--help")
    assert done.status == 0
    assert re.search(r"--port PORT\s", done.stdout)
    assert re.search(r"--bol-port PORT\s", done.stdout)


@pytest.mark.e2e
@pytest.mark.parametrize("option", ["--port", "--bol-port"])
async def test_demo_port_out_of_range_is_a_configuration_error_naming_its_option(
    option: str,
) -> None:
    done = await run("demo", option, "70000")
    assert done.status == 2
    assert done.stderr_lines == [f"bol-proxy: {option}: must be between 0 and 65535, "
                                 "got 70000"]


@pytest.mark.e2e
@pytest.mark.parametrize("option", ["--port", "--bol-port"])
async def test_demo_port_in_use_exits_1_naming_its_option(option: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        other = "--bol-port" if option == "--port" else "--port"
        done = await run("demo", option, port, other, str(free_port()))
    assert done.status == 1
    (line,) = done.stderr_lines
    assert line.startswith(f"bol-proxy: {option}: cannot listen on 127.0.0.1:{port}")
    assert "listen.port" not in line
