"""Which resource a request path names (no I/O).

Paths are matched against bol's path templates (``/retailer/orders/{order-id}``). A literal
segment beats a parameter, so ``/retailer/offers/export`` is the export and not an offer
with the id "export", as in bol's own routing. Templates that differ only in the names of
their parameters are one resource with several methods: bol reads a return by its return
id (``GET /retailer/returns/{return-id}``) and handles one by its rma id (``PUT
/retailer/returns/{rma-id}``). The ``-demo`` twins of the path roots (``/retailer-demo``,
``/shared-demo``) reach the same resources.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_PARAMETER = re.compile(r"\{([a-z-]+)\}")
DEMO_SUFFIX = "-demo"


@dataclass(frozen=True)
class Match:
    """A path matched to a resource: its templates, the parameter values, the root as sent."""

    templates: tuple[str, ...]  # without the -demo suffix
    values: tuple[str, ...]  # the parameters' values, in path order
    root: str  # first segment as sent: "retailer" or "retailer-demo"

    def params(self, template: str) -> dict[str, str]:
        """The parameters by the names ``template`` gives them."""
        return dict(zip(_PARAMETER.findall(template), self.values, strict=True))


class Routes:
    """Path templates, grouped by shape, tried from the most literal shape to the least."""

    def __init__(self, templates: Iterable[str]) -> None:
        shapes: dict[str, list[str]] = {}
        for template in templates:
            shapes.setdefault(_PARAMETER.sub("{}", template), []).append(template)
        compiled = []
        for shape, same in shapes.items():
            segments = shape.strip("/").split("/")
            # A literal segment before a parameter at the same position wins.
            rank = tuple(segment == "{}" for segment in segments)
            pattern = "".join("/" + ("([^/]+)" if s == "{}" else re.escape(s))
                              for s in segments)
            compiled.append((rank, tuple(same), re.compile(pattern)))
        compiled.sort(key=lambda entry: entry[0])
        self._compiled = [(same, regex) for _, same, regex in compiled]

    def match(self, path: str) -> Match | None:
        """The resource ``path`` names, or None when the imitation has no such resource."""
        root, _, rest = path.lstrip("/").partition("/")
        canonical = "/" + root.removesuffix(DEMO_SUFFIX) + ("/" + rest if rest else "")
        for templates, regex in self._compiled:
            if found := regex.fullmatch(canonical):
                return Match(templates, found.groups(), root)
        return None
