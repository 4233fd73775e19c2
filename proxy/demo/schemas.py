"""The request bodies of the writes the imitation accepts, as bol's v10 contract has them,
and their validation into bol's violations (no I/O).

Each schema follows bol's published one for the operation: required fields, types,
enumerations, lengths and ranges. A body that breaks it gets 400 listing every violation
by its path in the body (``pricing.bundlePrices[0].unitPrice``), as bol lists them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from .answers import Json, Violation, not_allowed

CONDITIONS = ["NEW", "AS_NEW", "GOOD", "REASONABLE", "MODERATE"]
DELIVERY_CODES = [f"24uurs-{hour}" for hour in range(23, 11, -1)] + [
    "1-2d", "2-3d", "3-5d", "4-8d", "1-8d", "MijnLeverbelofte", "VVB"]
CANCEL_REASONS = ["OUT_OF_STOCK", "REQUESTED_BY_CUSTOMER", "BAD_CONDITION", "HIGHER_SHIPCOST",
                  "INCORRECT_PRICE", "NOT_AVAIL_IN_TIME", "NO_BOL_GUARANTEE", "ORDERED_TWICE",
                  "RETAIN_ITEM", "TECH_ISSUE", "UNFINDABLE_ITEM", "OTHER"]
HANDLING_RESULTS = ["RETURN_RECEIVED", "EXCHANGE_PRODUCT", "RETURN_DOES_NOT_MEET_CONDITIONS",
                    "REPAIR_PRODUCT", "CUSTOMER_KEEPS_PRODUCT_PAID", "STILL_APPROVED"]
LANGUAGES = ["nl", "nl-BE", "fr", "fr-BE"]


def _object(required: Iterable[str], **properties: Json) -> Json:
    return {"type": "object", "required": list(required), "properties": properties}


def _list(items: Json, most: int, least: int = 1) -> Json:
    return {"type": "array", "items": items, "minItems": least, "maxItems": most}


def _text(least: int = 0, most: int | None = None) -> Json:
    return {"type": "string", "minLength": least} | ({"maxLength": most} if most else {})


def _choice(values: list[str]) -> Json:
    return {"type": "string", "enum": values}


def _number(least: float, most: float, kind: str = "number") -> Json:
    return {"type": kind, "minimum": least, "maximum": most}


_BOOLEAN: Json = {"type": "boolean"}
_FULFILMENT = _object(["method"], method=_choice(["FBR", "FBB"]),
                      deliveryCode=_choice(DELIVERY_CODES))
_PRICING = _object(["bundlePrices"], bundlePrices=_list(_object(
    ["quantity", "unitPrice"], quantity=_number(1, 24, "integer"),
    unitPrice=_number(1, 9999)), 4))
_OFFER_FIELDS: dict[str, Json] = {
    "economicOperatorId": _text(), "reference": _text(0, 100),
    "onHoldByRetailer": _BOOLEAN, "unknownProductTitle": _text(0, 500),
    "fulfilment": _FULFILMENT}

CREATE_OFFER = _object(
    ["ean", "condition", "pricing", "stock", "fulfilment"], ean=_text(1),
    condition=_object(["name"], name=_choice(CONDITIONS), category=_choice(["NEW", "SECONDHAND"]),
                      comment=_text(0, 2000)),
    pricing=_PRICING,
    stock=_object(["amount", "managedByRetailer"], amount=_number(0, 999, "integer"),
                  managedByRetailer=_BOOLEAN),
    **_OFFER_FIELDS)
UPDATE_OFFER = _object(["fulfilment"], **_OFFER_FIELDS)
UPDATE_PRICE = _object(["pricing"], pricing=_PRICING)
UPDATE_STOCK = _object(["amount", "managedByRetailer"], amount=_number(0, 999, "integer"),
                       managedByRetailer=_BOOLEAN)
OFFER_EXPORT = _object(["format"], format=_choice(["CSV"]))
CANCELLATION = _object(["orderItems"], orderItems=_list(_object(
    ["orderItemId", "reasonCode"], orderItemId=_text(1), reasonCode=_choice(CANCEL_REASONS)),
    1))
SHIPMENT = _object(
    ["orderItems"],
    orderItems=_list(_object(["orderItemId"], orderItemId=_text(1),
                             quantity={"type": "integer"}), 100),
    shipmentReference=_text(0, 90), shippingLabelId=_text(),
    transport=_object(["transporterCode"], transporterCode=_text(1), trackAndTrace=_text()))
HANDLE_RETURN = _object(["handlingResult", "quantityReturned"],
                        handlingResult=_choice(HANDLING_RESULTS),
                        quantityReturned=_number(1, 9999, "integer"))
PRODUCT_CONTENT = _object(
    ["language", "attributes"], language=_choice(LANGUAGES),
    attributes=_list(_object(["id", "values"], id=_text(1, 100), values=_list(
        _object(["value"], value=_text(1, 10000), unitId=_text()), 300)), 150),
    assets=_list(_object(["url", "labels"], url=_text(1),
                         labels=_list({"type": "string"}, 2)), 30, 0))
COMMISSIONS = _object(["commissionQueries"], commissionQueries=_list(_object(
    ["ean", "unitPrice"], ean=_text(1), condition=_choice(CONDITIONS),
    unitPrice=_number(0, 9999)), 100))
PROCESS_STATUSES = _object(["processStatusQueries"], processStatusQueries=_list(
    _object(["processStatusId"], processStatusId=_text(1)), 1000))


def violations(schema: Json, body: Any) -> list[Violation]:
    """Every way ``body`` breaks ``schema``, named by path, in bol's words where bol has
    words for it."""
    found: list[Violation] = []
    for error in sorted(Draft202012Validator(schema).iter_errors(body), key=_where):
        if error.validator == "required":  # one error per missing field, each naming all
            found += [Violation(_where(error, name), "Field is required.")
                      for name in error.validator_value if name not in error.instance]
        elif error.validator == "enum":
            found.append(Violation(_where(error), not_allowed(
                str(error.instance), [str(v) for v in error.validator_value])))
        else:
            found.append(Violation(_where(error), str(error.message)))
    return list(dict.fromkeys(found))


def _where(error: ValidationError, child: str | None = None) -> str:
    """``pricing.bundlePrices[0].unitPrice`` for an error at that place in the body."""
    where = ""
    for step in [*error.absolute_path, *([child] if child else [])]:
        where += f"[{step}]" if isinstance(step, int) else f".{step}"
    return where.lstrip(".") or "body"
