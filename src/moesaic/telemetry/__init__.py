"""Telemetry for MoE training: routing statistics and a TensorBoard + CSV metrics writer.

``collect_moe_stats`` / ``MoEStatsAccumulator`` read the routing numbers the ``moesaic.MoE``
layers keep; ``MetricsWriter`` writes nested metric dicts (e.g. ``{"moe": stats}``) as
TensorBoard scalars and a long-format ``metrics.csv``; ``read_csv_metrics`` reads the CSV back.
"""

from .moe_stats import MoEStatsAccumulator, collect_moe_stats
from .writer import MetricsWriter, read_csv_metrics

__all__ = ["MoEStatsAccumulator", "collect_moe_stats", "MetricsWriter", "read_csv_metrics"]
