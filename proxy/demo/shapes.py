"""bol's record shapes and formats (no I/O): date-times and dates as bol writes them,
the reduced forms in which lists show orders, shipments and returns, and the records that
are computed rather than kept (a shipment made of order items, a commission).

bol writes date-times with the Dutch offset; here always +01:00 (the imitation knows no
summer time).
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING

from .answers import Json

if TYPE_CHECKING:
    from .catalogue import Product

DUTCH = timezone(timedelta(hours=1))
FIXED_COMMISSION = 0.99  # euro per item sold, on top of the percentage


def stamp(seconds: float) -> str:
    """A Unix time as bol writes a date-time: ``2026-11-27T10:12:31+01:00``."""
    return datetime.fromtimestamp(int(seconds), DUTCH).isoformat()


def day(seconds: float) -> str:
    """A Unix time as bol writes a date: ``2026-11-27``."""
    return datetime.fromtimestamp(seconds, DUTCH).date().isoformat()


def parse_day(text: str) -> date:
    """A ``yyyy-MM-dd`` date; ValueError for anything else (also ``20261127``)."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise ValueError(text)
    return date.fromisoformat(text)


def item_status(item: Json) -> str:
    """OPEN while some of the item is neither shipped nor cancelled, else HANDLED."""
    done = item["quantityShipped"] + item["quantityCancelled"]
    return "OPEN" if done < item["quantity"] else "HANDLED"


def reduced_order(order: Json, items: list[Json] | None = None) -> Json:
    """An order as the order list shows it (``ReducedOrder``)."""
    return {
        "orderId": order["orderId"], "orderPlacedDateTime": order["orderPlacedDateTime"],
        "orderItems": [{
            "orderItemId": item["orderItemId"], "ean": item["product"]["ean"],
            "fulfilmentMethod": item["fulfilment"]["method"],
            "fulfilmentStatus": item_status(item), "quantity": item["quantity"],
            "quantityShipped": item["quantityShipped"],
            "quantityCancelled": item["quantityCancelled"],
            "cancellationRequest": item["cancellationRequest"],
            "latestChangedDateTime": item["latestChangedDateTime"],
        } for item in (order["orderItems"] if items is None else items)],
    }


def shipment(shipment_id: str, order: Json, items: list[tuple[Json, int]], at: float,
             reference: str, transport: Json) -> Json:
    """A shipment (``Shipment``) of ``items`` (order item, quantity) of ``order``."""
    return {
        "shipmentId": shipment_id, "shipmentDateTime": stamp(at),
        "shipmentReference": reference, "pickupPoint": order["pickupPoint"],
        "order": {"orderId": order["orderId"],
                  "orderPlacedDateTime": order["orderPlacedDateTime"]},
        "shipmentDetails": order["shipmentDetails"], "billingDetails": order["billingDetails"],
        "shipmentItems": [{
            "orderItemId": item["orderItemId"],
            "fulfilment": {k: item["fulfilment"][k]
                           for k in ("method", "distributionParty", "latestDeliveryDate")},
            "offer": item["offer"], "product": item["product"], "quantity": quantity,
            "quantityShipped": quantity, "unitPrice": item["unitPrice"],
            "commission": item["commission"],
        } for item, quantity in items],
        "transport": transport,
    }


def reduced_shipment(full: Json) -> Json:
    """A shipment as the shipment list shows it (``ReducedShipment``)."""
    return {
        "shipmentId": full["shipmentId"], "shipmentDateTime": full["shipmentDateTime"],
        "shipmentReference": full["shipmentReference"], "order": full["order"],
        "shipmentItems": [{"orderItemId": item["orderItemId"], "ean": item["product"]["ean"]}
                          for item in full["shipmentItems"]],
        "transport": {"transportId": full["transport"]["transportId"]},
    }


def reduced_return(full: Json) -> Json:
    """A return as the return list shows it (``ReducedReturn``)."""
    keep = ("rmaId", "orderId", "ean", "expectedQuantity", "returnReason", "handled",
            "processingResults")
    return {**{k: full[k] for k in ("returnId", "registrationDateTime", "fulfilmentMethod")},
            "returnItems": [{k: item[k] for k in keep} for item in full["returnItems"]]}


def commission(product: Product, condition: str, unit_price: float) -> Json:
    """What bol charges for selling ``product`` at ``unit_price`` (``Commission``)."""
    cost = FIXED_COMMISSION + unit_price * product.commission / 100
    return {"ean": product.ean, "condition": condition, "unitPrice": unit_price,
            "fixedAmount": FIXED_COMMISSION, "percentage": product.commission,
            "totalCost": round(cost, 2), "totalCostWithoutReduction": round(cost, 2),
            "reductions": []}
