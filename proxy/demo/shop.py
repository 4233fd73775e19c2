"""One run's shop: what the imitation holds, what tools read and how writes change it (no I/O).

Reads return bol-shaped records; every write returns the :class:`Process` that bol would
answer with, and makes its change only when that process settles (see ``processes``).
What is checked when: an unknown identifier in the path is refused at once (404), what a
write's body names (an order item, a quantity) is checked when the write is carried out
and fails the process with bol's kind of error message, as bol does.
"""

from __future__ import annotations

import csv
import io
import itertools
import uuid
from collections.abc import Iterator

from . import catalogue
from .answers import Json, not_found
from .catalogue import BY_EAN
from .processes import Process, Processes
from .shapes import item_status, shipment, stamp

OFFER_CHANGES = {"UPDATE_OFFER": "Update offer", "UPDATE_OFFER_PRICE": "Update the price of offer",
                 "UPDATE_OFFER_STOCK": "Update the stock of offer", "DELETE_OFFER": "Delete offer"}


class Shop:
    """The imitation's state for one run, in memory."""

    def __init__(self) -> None:
        self.orders = catalogue.orders()
        self.offers = catalogue.offers(self.orders)
        self.shipments = catalogue.shipments(self.orders)
        self.returns = catalogue.returns(self.orders)
        self.invoices = catalogue.invoices()
        self.inventory = catalogue.inventory()
        self.products = {p.ean: catalogue.catalog_product(p) for p in catalogue.PRODUCTS}
        self.exports: dict[str, str] = {}  # report id -> CSV, once its process succeeded
        self.uploads: dict[str, Json] = {}  # upload id -> upload report
        self.processes = Processes()
        self._serial: Iterator[int] = itertools.count(1)

    # -- reads: each raises the 404 problem for an id the shop does not hold

    def order(self, order_id: str) -> Json:
        """An order, in full (``Order``)."""
        if order_id not in self.orders:
            raise not_found("Order", order_id)
        return self.orders[order_id]

    def shipment(self, shipment_id: str) -> Json:
        """A shipment, in full (``Shipment``)."""
        if shipment_id not in self.shipments:
            raise not_found("Shipment", shipment_id)
        return self.shipments[shipment_id]

    def offer(self, offer_id: str) -> Json:
        """An offer (``RetailerOffer``)."""
        if offer_id not in self.offers:
            raise not_found("Offer", offer_id)
        return self.offers[offer_id]

    def export(self, report_id: str) -> str:
        """An offer export, as CSV."""
        if report_id not in self.exports:  # unknown, or its process has not succeeded yet
            raise not_found("Offer export", report_id)
        return self.exports[report_id]

    def invoice(self, invoice_id: str) -> Json:
        """An invoice as the invoice list shows it."""
        if invoice_id not in self.invoices:
            raise not_found("Invoice", invoice_id)
        return self.invoices[invoice_id]

    def return_(self, return_id: str) -> Json:
        """A return, in full (``Return``)."""
        if return_id not in self.returns:
            raise not_found("Return", return_id)
        return self.returns[return_id]

    def product(self, ean: str) -> Json:
        """A product of bol's catalogue (``CatalogProduct``)."""
        if ean not in self.products:
            raise not_found("Product", ean)
        return self.products[ean]

    def upload(self, upload_id: str) -> Json:
        """The report on a product content upload (``UploadReportResponse``)."""
        if upload_id not in self.uploads:
            raise not_found("Upload report", upload_id)
        return self.uploads[upload_id]

    def order_item(self, item_id: str) -> tuple[Json, Json] | None:
        """The order and the order item with this id."""
        for order in self.orders.values():
            for item in order["orderItems"]:
                if item["orderItemId"] == item_id:
                    return order, item
        return None

    def return_item(self, rma_id: str) -> Json | None:
        """The return item with this rma id (a return holds one or more)."""
        for found in self.returns.values():
            items: list[Json] = found["returnItems"]
            for item in items:
                if item["rmaId"] == rma_id:
                    return item
        return None

    # -- writes: each answers with a process; the change comes when the process settles

    def cancel(self, item_id: str, reason: str, now: float, root: str) -> Process:
        """Cancel what is left of an order item (``CancellationRequest``)."""
        def apply(at: float) -> str | None:
            found = self.order_item(item_id)
            if found is None:
                return f"Order item '{item_id}' does not exist."
            _, item = found
            if item_status(item) != "OPEN":
                return f"Order item '{item_id}' is already handled."
            item["quantityCancelled"] = item["quantity"] - item["quantityShipped"]
            item["latestChangedDateTime"] = stamp(at)
            return None

        return self.processes.start(item_id, "CANCEL_ORDER",
                                    f"Cancel order item {item_id} ({reason}).", now, apply,
                                    root)

    def ship(self, body: Json, now: float, root: str) -> Process:
        """Create a shipment of order items of one order (``ShipmentRequest``)."""
        lines: list[Json] = body["orderItems"]
        first = lines[0]["orderItemId"]

        def apply(at: float) -> str | None:
            shipped: list[tuple[Json, int]] = []
            owners: list[Json] = []
            for line in lines:
                found = self.order_item(line["orderItemId"])
                if found is None:
                    return f"Order item '{line['orderItemId']}' does not exist."
                owner, item = found
                if owners and owner is not owners[0]:
                    return "All order items of a shipment must belong to the same order."
                if item["fulfilment"]["method"] != "FBR":
                    return f"Order item '{item['orderItemId']}' is fulfilled by bol."
                left = item["quantity"] - item["quantityShipped"] - item["quantityCancelled"]
                quantity = line.get("quantity", left)
                if not 0 < quantity <= left:
                    return (f"Order item '{item['orderItemId']}' has {left} item(s) left to "
                            f"ship, not {quantity}.")
                owners.append(owner)
                shipped.append((item, quantity))
            for item, quantity in shipped:
                item["quantityShipped"] += quantity
                item["latestChangedDateTime"] = stamp(at)
            serial = next(self._serial)
            transport: Json = {"transportId": str(412778947 + serial),
                               **body.get("transport", {})}
            if "shippingLabelId" in body:
                transport["shippingLabelId"] = body["shippingLabelId"]
            shipment_id = str(641757635 + serial)
            created = shipment(shipment_id, owners[0], shipped, at,
                                         body.get("shipmentReference", ""), transport)
            self.shipments = {shipment_id: created, **self.shipments}  # newest first
            return None

        return self.processes.start(first, "CREATE_SHIPMENT",
                                    f"Create shipment for order item {first}.", now, apply,
                                    root)

    def create_offer(self, body: Json, now: float, root: str) -> Process:
        """Create an offer (``CreateOfferRequest``)."""
        offer_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"demo-offer:new:{next(self._serial)}"))
        ean, condition = body["ean"], body["condition"]

        def apply(at: float) -> str | None:
            for offer in self.offers.values():
                if offer["ean"] == ean and offer["condition"]["name"] == condition["name"]:
                    return f"An offer for EAN {ean} in condition {condition['name']} exists."
            product = BY_EAN.get(ean)
            title = product.title if product else body.get("unknownProductTitle", "")
            amount = body["stock"]["amount"]
            self.offers[offer_id] = {
                "offerId": offer_id, "ean": ean, "reference": body.get("reference", ""),
                "onHoldByRetailer": body.get("onHoldByRetailer", False),
                **({"unknownProductTitle": title} if product is None else {}),
                "pricing": body["pricing"],
                "stock": {"amount": amount, "correctedStock": self._corrected(ean, amount),
                          "managedByRetailer": body["stock"]["managedByRetailer"]},
                "fulfilment": body["fulfilment"],
                "store": {"productTitle": title, "visible": [{"countryCode": "NL"},
                                                            {"countryCode": "BE"}]},
                "condition": condition, "notPublishableReasons": [],
            }
            return None

        return self.processes.start(offer_id, "CREATE_OFFER",
                                    f"Create offer for EAN {ean}.", now, apply, root)

    def change_offer(self, offer_id: str, event_type: str, body: Json, now: float,
                     root: str) -> Process:
        """Update, reprice, restock or delete an offer (the body as the event needs it)."""
        self.offer(offer_id)  # an unknown offer is refused now, not later

        def apply(at: float) -> str | None:
            offer = self.offers.get(offer_id)
            if offer is None:
                return f"Offer '{offer_id}' does not exist."
            if event_type == "DELETE_OFFER":
                del self.offers[offer_id]
            elif event_type == "UPDATE_OFFER_STOCK":
                offer["stock"] = {
                    "amount": body["amount"],
                    "correctedStock": self._corrected(offer["ean"], body["amount"]),
                    "managedByRetailer": body["managedByRetailer"]}
            else:  # UPDATE_OFFER, UPDATE_OFFER_PRICE: the body's fields replace the offer's
                offer.update(body)
            return None

        return self.processes.start(offer_id, event_type,
                                    f"{OFFER_CHANGES[event_type]} with id {offer_id}.", now,
                                    apply, root)

    def export_offers(self, now: float, root: str) -> Process:
        """Ask for a CSV export of all offers, ready when its process succeeds."""
        report_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"demo-export:{next(self._serial)}"))

        def apply(at: float) -> str | None:
            self.exports[report_id] = self._offers_csv(at)
            return None

        return self.processes.start(report_id, "CREATE_OFFER_EXPORT",
                                    "Create an offer export.", now, apply, root)

    def handle_return(self, rma_id: str, body: Json, now: float, root: str) -> Process:
        """Handle a return item (``ReturnRequest``)."""
        if self.return_item(rma_id) is None:
            raise not_found("Return item", rma_id)

        def apply(at: float) -> str | None:
            item = self.return_item(rma_id)
            if item is None:
                return f"Return item with rma id {rma_id} does not exist."
            if item["handled"]:
                return f"Return item with rma id {rma_id} is already handled."
            item["handled"] = True
            item["processingResults"].append({
                "quantity": body["quantityReturned"], "processingResult": "ACCEPTED",
                "handlingResult": body["handlingResult"], "processingDateTime": stamp(at)})
            return None

        return self.processes.start(rma_id, "HANDLE_RETURN_ITEM",
                                    f"Handle return item with rma id {rma_id}.", now, apply,
                                    root)

    def add_content(self, body: Json, now: float, root: str) -> Process:
        """Send product content (``CreateProductContentSingleRequest``); its upload report
        shows progress, and the catalogue shows the content once it is published."""
        upload_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"demo-upload:{next(self._serial)}"))
        attributes: list[Json] = body["attributes"]
        report: Json = {
            "uploadId": upload_id, "language": body["language"], "status": "IN_PROGRESS",
            "attributes": [{"id": a["id"], "values": a["values"], "status": "IN_PROGRESS"}
                           for a in attributes],
            "assets": [{**asset, "status": "IN_PROGRESS"} for asset in body.get("assets", [])],
        }
        self.uploads[upload_id] = report

        def apply(at: float) -> str | None:
            eans = [v["value"] for a in attributes if a["id"] == "EAN" for v in a["values"]]
            product = self.products.get(eans[0]) if eans else None
            outcome = "PUBLISHED" if product is not None else "DECLINED"
            report["status"] = "COMPLETED"
            for entry in report["attributes"] + report["assets"]:
                entry["status"] = outcome
                if product is None:
                    entry["subStatus"] = "MATCH_TO_PRODUCT_FAILED"
            if product is None:
                return "Every content request needs the EAN of a product in the catalogue."
            kept = [a for a in product["attributes"]
                    if a["id"] not in {new["id"] for new in attributes}]
            product["attributes"] = kept + [{"id": a["id"], "values": a["values"]}
                                            for a in attributes]
            return None

        return self.processes.start(upload_id, "CREATE_PRODUCT_CONTENT",
                                    f"Create product content, upload {upload_id}.", now, apply,
                                    root)

    # -- helpers

    def _corrected(self, ean: str, amount: int) -> int:
        return max(0, amount - catalogue.reserved(self.orders, ean))

    def _offers_csv(self, at: float) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["offerId", "ean", "conditionName", "conditionCategory",
                         "conditionComment", "bundlePricesPrice", "fulfilmentDeliveryCode",
                         "stockAmount", "onHoldByRetailer", "fulfilmentType",
                         "mutationDateTime", "referenceCode", "correctedStock"])
        for offer in self.offers.values():
            writer.writerow([
                offer["offerId"], offer["ean"], offer["condition"]["name"],
                offer["condition"].get("category", ""), offer["condition"].get("comment", ""),
                offer["pricing"]["bundlePrices"][0]["unitPrice"],
                offer["fulfilment"].get("deliveryCode", ""), offer["stock"]["amount"],
                str(offer["onHoldByRetailer"]).lower(), offer["fulfilment"]["method"],
                stamp(at), offer["reference"], offer["stock"]["correctedStock"]])
        return out.getvalue()
