"""Percentiles and plain-text tables."""

import math


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    v = sorted(values)

    def at(q: float) -> float:
        return round(v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 2)

    return {"n": len(v), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": round(v[-1], 2)}


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.2f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def table(title: str, headers: list[str], rows: list[list]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [f"\n== {title}", line, "-" * len(line)]
    for r in cells:
        out.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(out)


def cpu_cells(cpu: dict) -> list:
    gens = cpu["generators_pct"]
    top = max(gens.values()) if gens else 0.0
    flag = (
        "SATURATED " + ",".join(cpu["generators_saturated"]) if cpu["generators_saturated"] else ""
    )
    return [
        cpu["service_pct"],
        cpu["postgres_pct"],
        cpu["redis_pct"],
        round(sum(gens.values()), 1),
        top,
        flag,
    ]


CPU_HEADERS = ["svc cpu%", "pg cpu%", "redis cpu%", "gens cpu%", "max gen%", "gen flag"]
