"""The peer a user would pick instead: FedAvg-LoRA of the whole model on every site, with Flower.

What a FlowerTune user runs, in Flower's simulation engine (Ray): every site is a ClientApp that
LoRA-trains the whole model for the round's local steps; the ServerApp's FedAvg averages the
LoRA weights, weighted by the examples each site trained on. The model, data, LoRA settings,
optimizer and the step itself are fsl-edge's (`baselines.lora_model`, `baselines.train_steps`),
and each site sees the batches it sees in the federation, so a comparison with fsl-edge differs
only in what is federated. A site keeps its AdamW state and its place in its data across rounds
in Flower's per-node `context.state`, as fsl-edge's sites keep theirs.

Flower is optional (`pip install "flwr[simulation]>=1.42,<2"`, which `make bench` runs; not an
extra of fsl-edge: flwr caps typer below 0.21, amqtt 0.12.1 needs 0.24, so pip could not resolve
one); nothing under tests/ imports this module.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage events from the simulation

INSTALL = ('Flower (PyPI flwr[simulation]) is needed for the Flower FedAvg-LoRA row: '
           'pip install "flwr[simulation]>=1.42,<2" (or `make bench`; pip warns that amqtt wants '
           'a newer typer: the embedded broker does not use it)')


def require_flower() -> None:
    """Fail at once, naming the install command, when Flower or its simulation engine is missing."""
    try:
        import flwr.simulation  # noqa: F401
        import ray  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"{INSTALL} ({e})") from e


@dataclass(frozen=True)
class FlowerJob:
    """What every ClientApp needs to rebuild its site; plain values, so Ray can ship it."""

    model: str  # a spec for fsl_edge.models.load
    data_dir: str
    settings: str  # LearningSettings as JSON
    threads: int  # torch threads in each client


@dataclass
class FlowerResult:
    adapter: dict  # the final global LoRA state (torch tensors)
    bytes_per_round: dict[str, float]  # serialised arrays per direction, all clients
    seconds: float


_CLIENT_CACHE: dict[FlowerJob, tuple] = {}  # one model per Ray actor, reused across calls


def _client_side(job: FlowerJob):
    """(peft model, sites, settings, pad id) of this actor, built once."""
    if job not in _CLIENT_CACHE:
        import torch

        from fsl_edge.baselines import lora_model
        from fsl_edge.config import LearningSettings
        from fsl_edge.data import pad_id_of
        from fsl_edge.models import load
        from fsl_edge.sites import load_sites

        torch.set_num_threads(job.threads)
        settings = LearningSettings.model_validate_json(job.settings)
        loaded = load(job.model)
        sites = load_sites(job.data_dir, loaded.tokenizer, settings.train.max_len)
        lm, _ = lora_model(loaded.model, settings, copy_model=False)
        _CLIENT_CACHE.clear()
        _CLIENT_CACHE[job] = (lm, sites, settings, pad_id_of(loaded.tokenizer))
    return _CLIENT_CACHE[job]


def _optimizer_state(optimizer, params) -> tuple[dict, dict]:
    """AdamW's per-parameter tensors, flattened for an ArrayRecord, and its step counts."""
    state = optimizer.state_dict()["state"]
    arrays = {f"{i}.{k}": v for i, s in state.items() for k, v in s.items() if k != "step"}
    steps = {str(i): float(s["step"]) for i, s in state.items()}
    return arrays, steps


def _restore_optimizer(optimizer, arrays: dict, steps: dict) -> None:
    import torch

    state = {}
    for key, tensor in arrays.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = tensor
    for i, step in steps.items():
        state[int(i)]["step"] = torch.tensor(step)
    optimizer.load_state_dict({"state": state,
                               "param_groups": optimizer.state_dict()["param_groups"]})


def _apps(job: FlowerJob, initial: dict, rounds: int, n_sites: int, box: dict):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        from fsl_edge.baselines import train_steps
        from fsl_edge.data import BatchStream
        from fsl_edge.lora import adapter_state, load_adapter_state
        from fsl_edge.simulation import site_seed

        lm, sites, settings, pad_id = _client_side(job)
        site = sites[int(context.node_config["partition-id"])]
        load_adapter_state(lm, msg.content["arrays"].to_torch_state_dict())
        params = [p for p in lm.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.train.lr)
        train_set = settings.train
        stream = BatchStream(site.train, train_set.batch_size, site_seed(train_set.seed, site.name),
                             pad_id)
        if "stream" in context.state:  # rounds after the first: carry on where this site stopped
            stream.load_state_dict({k: int(v) for k, v in context.state["stream"].items()})
            _restore_optimizer(optimizer, context.state["adam"].to_torch_state_dict(),
                               dict(context.state["adam_steps"]))
        loss, tokens, samples = train_steps(lm, optimizer, stream, train_set.steps)
        arrays, steps = _optimizer_state(optimizer, params)
        context.state["stream"] = ConfigRecord(stream.state_dict())
        context.state["adam"] = ArrayRecord(arrays)
        context.state["adam_steps"] = ConfigRecord(steps)
        reply = RecordDict({"arrays": ArrayRecord(adapter_state(lm)),
                            "metrics": MetricRecord({"train_loss": loss, "tokens": tokens,
                                                     "num-examples": samples})})
        return Message(content=reply, reply_to=msg)

    class CountingFedAvg(FedAvg):
        """Flower's FedAvg, counting the serialised arrays each round sends and receives."""

        def configure_train(self, server_round, arrays, config, grid):
            messages = list(super().configure_train(server_round, arrays, config, grid))
            box["adapter_down"] += len(messages) * sum(len(a.data) for a in arrays.values())
            return messages

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            box["adapter_up"] += sum(len(a.data) for m in replies if not m.has_error()
                                     for a in m.content["arrays"].values())
            return super().aggregate_train(server_round, replies)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = CountingFedAvg(fraction_train=1.0, fraction_evaluate=0.0,
                                  min_train_nodes=n_sites, min_available_nodes=n_sites)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=rounds)
        box["adapter"] = result.arrays.to_torch_state_dict()

    return server_app, client_app


def run_flower(job: FlowerJob, initial: dict, rounds: int, n_sites: int) -> FlowerResult:
    """FedAvg-LoRA from the `initial` adapter state for `rounds` rounds on `n_sites` simulated
    sites (one Ray actor at a time with every CPU, so sites train in turn, as fsl-edge's do)."""
    import logging

    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    box: dict = {"adapter_down": 0, "adapter_up": 0}
    server_app, client_app = _apps(job, initial, rounds, n_sites, box)
    cpus = os.cpu_count() or 1
    started = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n_sites,
                   backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "log_to_driver": True,
                                                 "object_store_memory": 256 << 20}})
    if "adapter" not in box:
        raise RuntimeError("the Flower simulation ended without a result: see its log above")
    sent = {k: box[k] / rounds for k in ("adapter_down", "adapter_up")}
    return FlowerResult(box["adapter"], sent, time.perf_counter() - started)
