"""The imitation's made-up shop as it starts: products, offers, orders, shipments, returns,
invoices and FBB inventory, in the shapes of bol's Retailer API v10 (no I/O).

Everything is deterministic, so that a tool developed against the demo sees the same data
on every run. Dates lie in the days before 27 November 2026.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, NamedTuple

from .answers import V10, Json
from .shapes import DUTCH, FIXED_COMMISSION, day, reduced_order, shipment, stamp

OPENED = datetime(2026, 11, 27, 10, 12, 31, tzinfo=DUTCH).timestamp()
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
ORDER_COUNT = 75


class Product(NamedTuple):
    """A product in bol's catalogue that the demo's retailer sells."""

    ean: str
    title: str
    price: float
    method: str  # FBR: shipped by the retailer, FBB: stored and shipped by bol
    chunk: str  # bol's product category (GPC chunk)
    commission: float  # percent of the price


PRODUCTS = (
    Product("8712626055143", "Stoneware coffee mug 350 ml", 9.99, "FBR", "30005965", 15.0),
    Product("8712626055167", "Bamboo cutting board, large", 19.95, "FBR", "30005968", 15.0),
    Product("8712626055174", "Cotton tea towels, set of 3", 12.5, "FBR", "30003362", 12.5),
    Product("8712626055181", "Cast iron skillet 26 cm", 39.99, "FBR", "30005970", 15.0),
    Product("8712626055198", "Glass storage jar 1 l", 7.49, "FBR", "30005965", 15.0),
    Product("8712626055204", "Linen napkins, set of 4", 24.95, "FBR", "30003362", 12.5),
    Product("8712626055211", "Enamel kettle 1.5 l", 34.5, "FBB", "30005972", 15.0),
    Product("8712626055228", "Beech wood spoon set", 11.99, "FBB", "30005968", 15.0),
)
BY_EAN = {product.ean: product for product in PRODUCTS}

CUSTOMERS = (
    ("FEMALE", "Billie", "Jansen", "Dorpstraat", "1", "1111ZZ", "Utrecht", "NL"),
    ("MALE", "Daan", "de Vries", "Kerkweg", "12", "2512AB", "Den Haag", "NL"),
    ("FEMALE", "Noor", "Bakker", "Molenlaan", "7", "5611CD", "Eindhoven", "NL"),
    ("UNKNOWN", "Sam", "Peeters", "Stationsstraat", "44", "2000", "Antwerpen", "BE"),
    ("MALE", "Lucas", "Visser", "Havenkade", "3", "3011EF", "Rotterdam", "NL"),
)


def offer_id(ean: str) -> str:
    """The id of the retailer's offer of a catalogue product."""
    return ("13722de8-8182-d161-5422-4a0a1caab5c8" if ean == PRODUCTS[0].ean
            else str(uuid.uuid5(uuid.NAMESPACE_URL, f"demo-offer:{ean}")))


def reference(product: Product) -> str:
    """The retailer's own reference for its offer of ``product``."""
    return "REF-12345" if product is PRODUCTS[0] else f"REF-{product.ean[-5:]}"


def customer(index: int, *, billing: bool) -> Json:
    """A made-up customer's shipment or billing details."""
    salutation, first, last, street, number, zip_code, city, country = CUSTOMERS[index % 5]
    details: Json = {"salutation": salutation, "firstName": first, "surname": last,
                     "streetName": street, "houseNumber": number, "zipCode": zip_code,
                     "city": city, "countryCode": country,
                     "email": f"{first.lower()}@verkopen.example"}
    if not billing:
        details["language"] = "nl" if country == "NL" else "nl-BE"
    return details


def _offer(product: Product, amount: int, corrected: int) -> Json:
    fulfilment: Json = {"method": product.method}
    if product.method == "FBR":
        fulfilment["deliveryCode"] = "24uurs-23"
    return {
        "offerId": offer_id(product.ean), "ean": product.ean,
        "reference": reference(product),
        "onHoldByRetailer": False,
        "pricing": {"bundlePrices": [{"quantity": 1, "unitPrice": product.price}]},
        "stock": {"amount": amount, "correctedStock": corrected, "managedByRetailer": False},
        "fulfilment": fulfilment,
        "store": {"productTitle": product.title,
                  "visible": [{"countryCode": "NL"}, {"countryCode": "BE"}]},
        "condition": {"name": "NEW", "category": "NEW"},
        "notPublishableReasons": [],
    }


def reserved(all_orders: dict[str, Json], ean: str) -> int:
    """How many items of ``ean`` open orders still claim."""
    return sum(item["quantity"] - item["quantityShipped"] - item["quantityCancelled"]
               for order in all_orders.values() for item in order["orderItems"]
               if item["product"]["ean"] == ean)


def offers(all_orders: dict[str, Json]) -> dict[str, Json]:
    """One offer per product, by offer id; its corrected stock leaves out what open
    orders claim, as bol's does."""
    made = []
    for i, product in enumerate(PRODUCTS):
        free = 5 + 3 * i
        made.append(_offer(product, reserved(all_orders, product.ean) + free, free))
    return {offer["offerId"]: offer for offer in made}


def _order_item(item_id: str, product: Product, quantity: int, shipped: bool,
                placed: float) -> Json:
    return {
        "orderItemId": item_id, "cancellationRequest": False,
        "fulfilment": {"method": product.method,
                       "distributionParty": "RETAILER" if product.method == "FBR" else "BOL",
                       "latestDeliveryDate": day(placed + DAY),
                       "expiryDate": day(placed + 3 * DAY), "timeFrameType": "REGULAR"},
        "offer": {"offerId": offer_id(product.ean), "reference": reference(product)},
        "product": {"ean": product.ean, "title": product.title},
        "quantity": quantity, "quantityShipped": quantity if shipped else 0,
        "quantityCancelled": 0, "unitPrice": product.price,
        "totalPrice": round(product.price * quantity, 2), "discounts": [],
        "commission": round(FIXED_COMMISSION + product.price * product.commission / 100, 2),
        "latestChangedDateTime": stamp(placed + (3 * HOUR if shipped else 0)),
    }


def orders() -> dict[str, Json]:
    """75 orders, newest first: most open and fulfilled by the retailer (FBR), every tenth
    fulfilled by bol (FBB) and every tenth but one already shipped."""
    made: dict[str, Json] = {}
    for i in range(ORDER_COUNT):
        placed = OPENED - i * 97 * MINUTE
        fbb = i % 10 == 9
        shipped = i % 10 in (8, 9)
        first = PRODUCTS[6 + i % 2] if fbb else PRODUCTS[(i * 3) % 6]
        lines = [first] if i % 4 != 1 else [
            first, PRODUCTS[6 + (i + 1) % 2] if fbb else PRODUCTS[(i * 3 + 1) % 6]]
        items = [_order_item(str(2012345678 + 2 * i + n), product, 1 + (i % 3 == 2), shipped,
                             placed) for n, product in enumerate(lines)]
        if i == 3:  # the customer asked to cancel: bol's flag for the retailer to act on
            items[0]["cancellationRequest"] = True
        order_id = str(1043946570 - 1171 * i)
        made[order_id] = {
            "orderId": order_id, "pickupPoint": False, "orderPlacedDateTime": stamp(placed),
            "shipmentDetails": customer(i, billing=False),
            "billingDetails": customer(i, billing=True), "orderItems": items,
        }
    return made


def shipments(all_orders: dict[str, Json]) -> dict[str, Json]:
    """A shipment for every order that the catalogue made shipped, newest first."""
    made: dict[str, Json] = {}
    for n, order in enumerate(all_orders.values()):
        items = order["orderItems"]
        if items[0]["quantityShipped"] == 0:
            continue
        at = datetime.fromisoformat(order["orderPlacedDateTime"]).timestamp() + 3 * HOUR
        fbr = items[0]["fulfilment"]["method"] == "FBR"
        shipment_id = str(541757635 + n)
        made[shipment_id] = shipment(
            shipment_id, order, [(item, item["quantity"]) for item in items], at,
            f"BOLCOM{n:03d}",
            {"transportId": str(312778947 + n), "transporterCode": "TNT" if fbr else "BOL",
             "trackAndTrace": f"3SBOL{98765432 + n:010d}",
             "transportEvents": [{"eventCode": "AT_TRANSPORTER", "eventDateTime": stamp(at)}]})
    return made


def returns(all_orders: dict[str, Json]) -> dict[str, Json]:
    """Three returns of the oldest shipped FBR orders; the oldest already handled."""
    shipped = [o for o in all_orders.values()
               if o["orderItems"][0]["quantityShipped"] and
               o["orderItems"][0]["fulfilment"]["method"] == "FBR"][-3:]
    made: dict[str, Json] = {}
    for k, order in enumerate(shipped):
        item = order["orderItems"][0]
        at = datetime.fromisoformat(order["orderPlacedDateTime"]).timestamp() + 2 * DAY
        handled = k == 2  # the oldest
        return_id = str(15892026 + k)
        made[return_id] = {
            "returnId": return_id, "registrationDateTime": stamp(at), "fulfilmentMethod": "FBR",
            "returnItems": [{
                "rmaId": str(31234567 + k), "orderId": order["orderId"],
                "ean": item["product"]["ean"], "title": item["product"]["title"],
                "expectedQuantity": 1,
                "returnReason": {"mainReason": "Niet naar verwachting",
                                 "detailedReason": "Kleur wijkt af van de afbeelding",
                                 "customerComments": "Toch een andere kleur dan verwacht."},
                "trackAndTrace": f"3SBOL{12345678 + k:010d}", "transporterName": "PostNL",
                "handled": handled,
                "processingResults": [{
                    "quantity": 1, "processingResult": "ACCEPTED",
                    "handlingResult": "RETURN_RECEIVED",
                    "processingDateTime": stamp(at + DAY)}] if handled else [],
                "customerDetails": {k2: v for k2, v in customer(k, billing=True).items()
                                    if k2 != "email"},
            }],
        }
    return made


def _money(amount: float) -> Json:
    return {"amount": round(amount, 2), "currencyID": "EUR"}


def invoices() -> dict[str, Json]:
    """The monthly invoices of September and October 2026, by invoice id."""
    made: dict[str, Json] = {}
    for n, (start, end, issued, net) in enumerate((
            ("2026-09-01", "2026-09-30", "2026-10-01", 184.35),
            ("2026-10-01", "2026-10-31", "2026-11-02", 231.10))):
        invoice_id = str(4500022543921 + n)
        made[invoice_id] = {
            "invoiceId": invoice_id, "invoiceType": "SALES_INVOICE", "issueDate": issued,
            "invoicePeriod": {"startDate": start, "endDate": end},
            "invoiceMediaTypes": {"availableMediaTypes": [V10]},
            "specificationMediaTypes": {"availableMediaTypes": [V10]},
            "legalMonetaryTotal": {
                "lineExtensionAmount": _money(net), "taxExclusiveAmount": _money(net),
                "taxInclusiveAmount": _money(net * 1.21), "payableAmount": _money(net * 1.21)},
        }
    return made


def inventory() -> list[Json]:
    """bol's warehouse stock of the FBB products (``Inventory``)."""
    return [{"ean": p.ean, "bsku": str(2950002126612 + n), "gradedStock": n,
             "regularStock": 3 if n else 24, "title": p.title}
            for n, p in enumerate(p for p in PRODUCTS if p.method == "FBB")]


def catalog_product(product: Product) -> Json:
    """A product as bol's catalogue describes it (``CatalogProduct``)."""
    def attribute(ident: str, value: str) -> Json:
        return {"id": ident, "values": [{"value": value}]}

    return {
        "published": True, "gpc": {"chunkId": product.chunk}, "enrichment": {"status": 1},
        "attributes": [attribute("EAN", product.ean), attribute("Title", product.title),
                       attribute("Description", f"{product.title}. Made up for the demo.")],
        "parties": [{"name": "Demo Home", "type": "Brand", "role": "BRAND"}],
    }


ORDERS_AT_START = orders()
ORDER: dict[str, Any] = reduced_order(next(iter(ORDERS_AT_START.values())))
OFFER: dict[str, Any] = next(iter(offers(ORDERS_AT_START).values()))
