"""The Retailer API operations the imitation serves: query parameters in, bol-shaped answers
out (no I/O).

Lists come in pages of 50, newest first, with bol's defaults for their filters (orders and
shipments fulfilled by the retailer, open orders); a page past the end is ``{}``, as bol
answers an empty list. Writes answer 202 with a process status.
"""

from __future__ import annotations

from datetime import datetime

from . import catalogue, schemas
from .answers import (
    ADVERTISER_V10,
    V10,
    V10_CSV,
    Answer,
    Json,
    Violation,
    invalid,
    json_answer,
    not_found,
)
from .calls import PAGE_SIZE, Call, Handler, Operation, Query, accepted, page_of
from .catalogue import BY_EAN
from .shapes import (
    FIXED_COMMISSION,
    commission,
    item_status,
    reduced_order,
    reduced_return,
    reduced_shipment,
)
from .shop import Shop


def _changed(item: Json) -> float:
    return datetime.fromisoformat(item["latestChangedDateTime"]).timestamp()


# -- orders


def _list_orders(shop: Shop, call: Call) -> Answer:
    query = Query(call.query)
    page = query.integer("page", 1, default=1)
    method = query.choice("fulfilment-method", ("FBR", "FBB", "ALL"), "FBR")
    status = query.choice("status", ("OPEN", "SHIPPED", "ALL"), "OPEN")
    minutes = query.integer("change-interval-minute", 1, 60)
    changed_on = query.day("latest-change-date")
    query.boolean("vvb-only")  # no order of the demo is VVB; accepted and ignored
    query.check()

    def wanted(item: Json) -> bool:
        return ((method == "ALL" or item["fulfilment"]["method"] == method)
                and (status == "ALL" or (item_status(item) == "OPEN") == (status == "OPEN"))
                and (minutes is None or _changed(item) >= call.now - 60 * minutes)
                and (changed_on is None or
                     item["latestChangedDateTime"][:10] == changed_on.isoformat()))

    listed = [reduced_order(order, items) for order in shop.orders.values()
              if (items := [item for item in order["orderItems"] if wanted(item)])]
    return json_answer(page_of("orders", listed, page))


def _get_order(shop: Shop, call: Call) -> Answer:
    return json_answer(shop.order(call.params["order-id"]))


def _cancel_order_item(shop: Shop, call: Call) -> Answer:
    (item,) = call.body["orderItems"]  # the schema allows exactly one
    return accepted(shop.cancel(item["orderItemId"], item["reasonCode"], call.now,
                                call.shared_root), call)


# -- shipments


def _list_shipments(shop: Shop, call: Call) -> Answer:
    query = Query(call.query)
    page = query.integer("page", 1, default=1)
    order_id = call.query.get("order-id")
    # bol lists the retailer's own shipments unless asked otherwise or for one order.
    method = query.choice("fulfilment-method", ("FBR", "FBB"), None if order_id else "FBR")
    query.check()
    listed = [reduced_shipment(s) for s in shop.shipments.values()
              if (method is None or s["shipmentItems"][0]["fulfilment"]["method"] == method)
              and (order_id is None or s["order"]["orderId"] == order_id)]
    return json_answer(page_of("shipments", listed, page))


def _get_shipment(shop: Shop, call: Call) -> Answer:
    return json_answer(shop.shipment(call.params["shipment-id"]))


def _create_shipment(shop: Shop, call: Call) -> Answer:
    return accepted(shop.ship(call.body, call.now, call.shared_root), call)


# -- offers


def _create_offer(shop: Shop, call: Call) -> Answer:
    return accepted(shop.create_offer(call.body, call.now, call.shared_root), call)


def _get_offer(shop: Shop, call: Call) -> Answer:
    return json_answer(shop.offer(call.params["offer-id"]))


def _offer_change(event_type: str) -> Handler:
    def handler(shop: Shop, call: Call) -> Answer:
        return accepted(shop.change_offer(call.params["offer-id"], event_type,
                                          call.body or {}, call.now, call.shared_root), call)
    return handler


def _export_offers(shop: Shop, call: Call) -> Answer:
    return accepted(shop.export_offers(call.now, call.shared_root), call)


def _get_offer_export(shop: Shop, call: Call) -> Answer:
    return Answer(200, shop.export(call.params["report-id"]).encode(), V10_CSV)


def _list_inventory(shop: Shop, call: Call) -> Answer:
    query = Query(call.query)
    page = query.integer("page", 1, default=1)
    stock = query.choice("stock", ("SUFFICIENT", "INSUFFICIENT"))
    state = query.choice("state", ("REGULAR", "GRADED"))
    text = call.query.get("query", "").lower()
    bounds = call.query.get("quantity", "")  # "10-20": regular stock within the range
    low, _, high = bounds.partition("-")
    if bounds and not (low.isdigit() and high.isdigit()):
        query.violations.append(Violation("quantity", f"'{bounds}' is not a range like 10-20."))
    query.check()

    def wanted(entry: Json) -> bool:
        amount = entry["gradedStock" if state == "GRADED" else "regularStock"]
        return ((stock is None or (amount >= 10) == (stock == "SUFFICIENT"))
                and (state != "GRADED" or amount > 0)
                and (not bounds or int(low) <= amount <= int(high))
                and (text in entry["ean"] or text in entry["title"].lower()))

    return json_answer(page_of("inventory", [e for e in shop.inventory if wanted(e)], page))


# -- invoices


def _list_invoices(shop: Shop, call: Call) -> Answer:
    query = Query(call.query)
    start, end = query.day("period-start-date"), query.day("period-end-date")
    query.check()
    if start and end and not 0 <= (end - start).days <= 31:  # bol allows a month at most
        raise invalid(Violation("period-end-date", "The period must be 0 to 31 days long."))
    listed = [invoice for invoice in shop.invoices.values()
              if (end is None or invoice["invoicePeriod"]["startDate"] <= end.isoformat())
              and (start is None or invoice["invoicePeriod"]["endDate"] >= start.isoformat())]
    return json_answer(page_of("invoiceListItems", listed, 1))


def _get_invoice(shop: Shop, call: Call) -> Answer:
    invoice = shop.invoice(call.params["invoice-id"])
    lines = [{"description": f"Commission {p.title}", "quantity": 1 + n,
              "amount": round((1 + n) * FIXED_COMMISSION, 2)}
             for n, p in enumerate(catalogue.PRODUCTS[:3])]
    return json_answer({**invoice, "invoiceLines": lines})


# -- returns


def _list_returns(shop: Shop, call: Call) -> Answer:
    query = Query(call.query)
    page = query.integer("page", 1, default=1)
    handled = query.boolean("handled")
    method = query.choice("fulfilment-method", ("FBR", "FBB"), "FBR")
    query.check()
    listed = [reduced_return(r) for r in shop.returns.values()
              if r["fulfilmentMethod"] == method
              and (handled is None or all(i["handled"] == handled for i in r["returnItems"]))]
    return json_answer(page_of("returns", listed, page))


def _get_return(shop: Shop, call: Call) -> Answer:
    return json_answer(shop.return_(call.params["return-id"]))


def _handle_return(shop: Shop, call: Call) -> Answer:
    rma_id = call.params["rma-id"]
    if not (rma_id.isascii() and rma_id.isdigit()):  # bol's rma ids are numbers
        raise invalid(Violation("rma-id", f"'{rma_id}' is not a number."))
    return accepted(shop.handle_return(rma_id, call.body, call.now, call.shared_root), call)


# -- product content and commissions


def _get_catalog_product(shop: Shop, call: Call) -> Answer:
    return json_answer(shop.product(call.params["ean"]))


def _add_product_content(shop: Shop, call: Call) -> Answer:
    return accepted(shop.add_content(call.body, call.now, call.shared_root), call)


def _get_upload_report(shop: Shop, call: Call) -> Answer:
    return json_answer(shop.upload(call.params["upload-id"]))


def _get_commission(shop: Shop, call: Call) -> Answer:
    query = Query(call.query)
    condition = query.choice("condition", schemas.CONDITIONS, "NEW")
    price = query.number("unit-price", 0, 9999)
    query.check()
    ean = call.params["ean"]
    if ean not in BY_EAN:
        raise not_found("Product", ean)
    return json_answer(commission(BY_EAN[ean], str(condition), float(price or 0)))


def _bulk_commissions(shop: Shop, call: Call) -> Answer:
    # EANs outside bol's catalogue are left out of the answer.
    return json_answer({"commissions": [
        commission(BY_EAN[q["ean"]], q.get("condition", "NEW"), q["unitPrice"])
        for q in call.body["commissionQueries"] if q["ean"] in BY_EAN]})


# -- process statuses


def _statuses(shop: Shop, call: Call, ids: list[str]) -> Answer:
    found = [p.view(call.origin) for i in ids if (p := shop.processes.poll(i, call.now))]
    return json_answer({"processStatuses": found})


def _get_process_status(shop: Shop, call: Call) -> Answer:
    process_id = call.params["process-status-id"]
    process = shop.processes.poll(process_id, call.now)
    if process is None:
        raise not_found("Process status", process_id)
    return json_answer(process.view(call.origin))


def _find_process_statuses(shop: Shop, call: Call) -> Answer:
    query = Query(call.query)
    entity = call.query.get("entity-id")
    if entity is None:
        query.violations.append(Violation("entity-id", "Field is required."))
    event = query.choice("event-type", EVENT_TYPES)
    if event is None:
        query.violations.append(Violation("event-type", "Field is required."))
    page = query.integer("page", 1, default=1)
    query.check()
    ids = shop.processes.of_entity(str(entity), str(event))
    return _statuses(shop, call, ids[((page or 1) - 1) * PAGE_SIZE:][:PAGE_SIZE])


def _bulk_process_statuses(shop: Shop, call: Call) -> Answer:
    # Ids that bol does not know (or no longer keeps) are left out of the answer.
    return _statuses(shop, call, [q["processStatusId"]
                                  for q in call.body["processStatusQueries"]])


EVENT_TYPES = ("CREATE_SHIPMENT", "CANCEL_ORDER", "HANDLE_RETURN_ITEM", "DELETE_OFFER",
               "CREATE_OFFER", "UPDATE_OFFER", "UPDATE_OFFER_STOCK", "UPDATE_OFFER_PRICE",
               "CREATE_OFFER_EXPORT", "CREATE_PRODUCT_CONTENT")
SHARED = (V10, ADVERTISER_V10)  # the shared API serves the retailer and the advertiser API

OPERATIONS = (
    Operation("GET", "/retailer/orders", _list_orders),
    Operation("GET", "/retailer/orders/{order-id}", _get_order),
    Operation("PUT", "/retailer/orders/cancellation", _cancel_order_item, schemas.CANCELLATION),
    Operation("GET", "/retailer/shipments", _list_shipments),
    Operation("POST", "/retailer/shipments", _create_shipment, schemas.SHIPMENT),
    Operation("GET", "/retailer/shipments/{shipment-id}", _get_shipment),
    Operation("POST", "/retailer/offers", _create_offer, schemas.CREATE_OFFER),
    Operation("GET", "/retailer/offers/{offer-id}", _get_offer),
    Operation("PUT", "/retailer/offers/{offer-id}", _offer_change("UPDATE_OFFER"),
              schemas.UPDATE_OFFER),
    Operation("DELETE", "/retailer/offers/{offer-id}", _offer_change("DELETE_OFFER")),
    Operation("PUT", "/retailer/offers/{offer-id}/price", _offer_change("UPDATE_OFFER_PRICE"),
              schemas.UPDATE_PRICE),
    Operation("PUT", "/retailer/offers/{offer-id}/stock", _offer_change("UPDATE_OFFER_STOCK"),
              schemas.UPDATE_STOCK),
    Operation("POST", "/retailer/offers/export", _export_offers, schemas.OFFER_EXPORT),
    Operation("GET", "/retailer/offers/export/{report-id}", _get_offer_export,
              produces=(V10_CSV,)),
    Operation("GET", "/retailer/inventory", _list_inventory),
    Operation("GET", "/retailer/invoices", _list_invoices),
    Operation("GET", "/retailer/invoices/{invoice-id}", _get_invoice),
    Operation("GET", "/retailer/returns", _list_returns),
    Operation("GET", "/retailer/returns/{return-id}", _get_return),
    Operation("PUT", "/retailer/returns/{rma-id}", _handle_return, schemas.HANDLE_RETURN),
    Operation("GET", "/retailer/content/catalog-products/{ean}", _get_catalog_product),
    Operation("POST", "/retailer/content/products", _add_product_content,
              schemas.PRODUCT_CONTENT),
    Operation("GET", "/retailer/content/upload-report/{upload-id}", _get_upload_report),
    Operation("GET", "/retailer/commission/{ean}", _get_commission),
    Operation("POST", "/retailer/commission", _bulk_commissions, schemas.COMMISSIONS),
    Operation("GET", "/shared/process-status", _find_process_statuses, produces=SHARED),
    Operation("POST", "/shared/process-status", _bulk_process_statuses,
              schemas.PROCESS_STATUSES, consumes=SHARED, produces=SHARED),
    Operation("GET", "/shared/process-status/{process-status-id}", _get_process_status,
              produces=SHARED),
)
