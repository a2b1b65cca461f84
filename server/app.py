"""The ServerApp: the federated run loop of ``fedsparse.federation.engine`` over Flower messages."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsparse.config import RunConfig
from fedsparse.console import dataset_line, summary_table
from fedsparse.data import load_run_data
from fedsparse.experiments.flower_run import check_flower_config
from fedsparse.federation.aggregation import needs_row_weights
from fedsparse.federation.engine import check_population, check_resumable, run_federation
from fedsparse.federation.grouping import partitions_needed
from fedsparse.federation.inprocess import population_of
from fedsparse.federation.secagg_vectors import weight_bound
from fedsparse.run_files import new_run_dir
from server.transport import FlowerTransport, discover_partitions

NODE_WAIT_SECONDS = 300.0  # how long to wait for every supernode to register before round 1
NODE_POLL_SECONDS = 0.2

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Load counts, find the supernodes, run the federation, write the run directory."""
    logger = logging.getLogger("fedsparse")
    logger.setLevel(logging.INFO)
    if not logger.handlers:  # per-round lines go to the ServerApp's output, which `flwr run --stream` shows
        logger.addHandler(logging.StreamHandler(sys.stdout))
    config = RunConfig.from_flat(context.run_config)
    # The server reads the dataset only for its sizes (and for the central-NMF oracle, when chosen).
    logger.info("loading dataset %s ...", config.data.path or config.data.dataset)
    started = time.perf_counter()
    data = load_run_data(config)
    logger.info(dataset_line(data.name, data.counts(), time.perf_counter() - started))
    population = population_of(data, config)
    check_population(config, population)  # a config that cannot run stops here, before any output
    check_flower_config(config)
    if config.resume_dir:  # devices start with empty context.state: see README, "Resume"
        check_resumable(config, Path(config.resume_dir))
    expected = partitions_needed(data.n_users, config.fed.clients_per_node)
    logger.info("waiting for %d supernodes to register and name their partition (one message each) ...", expected)
    started = time.perf_counter()
    node_of_partition = discover_partitions(grid, expected, NODE_WAIT_SECONDS, NODE_POLL_SECONDS)
    logger.info("%d supernodes ready, %.1f s", len(node_of_partition), time.perf_counter() - started)
    run_dir = (Path(config.resume_dir) if config.resume_dir
               else new_run_dir(config.results_dir, f"flwr-{data.name}-{config.sparse.policy}"))
    transport = FlowerTransport(
        grid, node_of_partition, config.fed.clients_per_node, config.fed.round_timeout or None, context,
        weight_bound(config), placement_log=run_dir / "placement.jsonl",
        secure_row_weights=needs_row_weights(config.fed.aggregation), stage_log=run_dir / "secagg_stages.jsonl",
    )
    summary = run_federation(
        config, population, transport, run_dir, data.train, resume=bool(config.resume_dir),
        # The Flower app's content hash names the exact code even when the launcher passed no code-version.
        metadata={"engine": "flower", "dataset": data.counts(), "dataset_checksum": data.checksum(),
                  "flower_app_hash": grid.run.fab_hash},
    )
    logger.info(summary_table(summary, run_dir))
