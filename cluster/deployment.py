"""One description of a deployment, and the one function that brings it up.

A ``DeploymentSpec`` (model and shards, stores, transport, decoders, coordinator) is read
from YAML or JSON and validated once, when it is made. ``build_deployment(spec)`` prepares
the shards on first use, plans which store holds which expert, and starts or attaches to
named actors in ``spec.namespace``:

    {name}-store-{i}      ExpertStore, detached: found by any job, shared by every decoder
    {name}-decoder-{i}    Decoder (actors/decoder.py), detached
    {name}-coordinator    Coordinator (actors/coordinator.py), detached

An actor that already exists under its name is attached to, after checking that it serves
the same model and placement (stores) or configuration (decoders). ``decoders.count = 0``
brings up the stores only. Every entry point (CLI, benchmarks, tests) goes through here.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from cluster.placement import Placement, plan_placement
from specmoe.affinity import has_affinity, load_affinity
from specmoe.config import SHIPPED_MODEL, DecoderConfig, EngineConfig
from specmoe.link import LinkConfig

TRANSPORT_KINDS = ("ray", "grpc")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_int(value, where: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where} must be an integer >= {low}, got {value!r}")


def _check_number(value, where: str, low: float = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
        raise ValueError(f"{where} must be a number >= {low}, got {value!r}")


def _check_resources(value, where: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of Ray resource name to amount, got {value!r}")
    for name, amount in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: resource names must be non-empty strings, got {name!r}")
        _check_number(amount, f"{where}[{name!r}]")


@dataclass
class ModelSpec:
    """The model: a Hugging Face directory, and its prepared shards (None: prepared on first use
    under the shard cache, ``cluster.sources.prepared_dir``)."""

    path: str = str(SHIPPED_MODEL)
    dtype: str = "fp32"
    shards: str | None = None
    max_model_len: int | None = None

    def __post_init__(self):
        from specmoe.loader import DTYPES

        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"model.path must be a model directory, got {self.path!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.shards is not None and (not isinstance(self.shards, str) or not self.shards):
            raise ValueError(f"model.shards must be a prepared directory or null, got {self.shards!r}")
        if self.max_model_len is not None:
            _check_int(self.max_model_len, "model.max_model_len", 2)


@dataclass
class StoreSpec:
    """``count`` ExpertStore actors, each shard on ``replication`` of them; ``max_restarts=-1``:
    a store that dies is restarted (and publishes its experts again) without limit."""

    count: int = 1
    replication: int = 1
    resources: dict = field(default_factory=lambda: {"expert_store": 1})
    max_restarts: int = -1

    def __post_init__(self):
        _check_int(self.count, "stores.count", 1)
        _check_int(self.replication, "stores.replication", 1)
        if self.replication > self.count:
            raise ValueError(f"stores.replication must be in [1, stores.count={self.count}], got {self.replication}")
        _check_resources(self.resources, "stores.resources")
        _check_int(self.max_restarts, "stores.max_restarts", -1)


@dataclass
class TransportSpec:
    """How decoders fetch experts: the Ray object store or gRPC (with optional token and TLS).

    ``verify`` checks every received expert against the manifest's CRC-32. ``link`` puts every
    decoder's source (and the driver's) behind an emulated link (bandwidth, latency, FIFO
    queue; ``specmoe.link``). ``root_cert`` is
    the certificate clients trust (None: ``tls_cert`` itself, for a self-signed store
    certificate); ``server_name`` overrides the name checked against it.
    """

    kind: str = "ray"
    verify: bool = True
    token: str | None = field(default=None, repr=False)  # a secret: kept out of logs
    tls_cert: str | None = None
    tls_key: str | None = None
    root_cert: str | None = None
    server_name: str | None = None
    chunk_bytes: int = 1 << 20  # gRPC message payload
    link: LinkConfig | None = None  # an emulated link in front of every decoder's source (specmoe.link)

    def __post_init__(self):
        if isinstance(self.link, dict):
            values = _known(self.link, LinkConfig, "transport.link")
            try:
                self.link = LinkConfig(**values)
            except ValueError as err:
                raise ValueError(f"transport.link: {err}") from None
        if self.link is not None and not isinstance(self.link, LinkConfig):
            raise ValueError(f"transport.link must be a mapping (gbps, latency_us, queue) or null, got {self.link!r}")
        if self.kind not in TRANSPORT_KINDS:
            raise ValueError(f"transport.kind must be one of {', '.join(TRANSPORT_KINDS)}, got {self.kind!r}")
        if not isinstance(self.verify, bool):
            raise ValueError(f"transport.verify must be true or false, got {self.verify!r}")
        grpc_only = ("token", "tls_cert", "tls_key", "root_cert", "server_name")
        for name in grpc_only:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"transport.{name} must be a non-empty string or null, got {value!r}")
        given = [name for name in grpc_only if getattr(self, name) is not None]
        if self.kind != "grpc" and given:
            raise ValueError(f"transport.{given[0]} applies to the grpc transport only (transport.kind is {self.kind!r})")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("transport.tls_cert and transport.tls_key (PEM files) go together: give both or neither")
        for name in ("root_cert", "server_name"):
            if getattr(self, name) is not None and self.tls_cert is None:
                raise ValueError(f"transport.{name} needs TLS on the stores (transport.tls_cert and tls_key)")
        from actors.grpc_service import MIN_CHUNK_BYTES

        _check_int(self.chunk_bytes, "transport.chunk_bytes", MIN_CHUNK_BYTES)

    def server_config(self):
        """The stores' gRPC server configuration (None for the ray transport)."""
        if self.kind != "grpc":
            return None
        from actors.grpc_service import ServerConfig

        return ServerConfig(token=self.token, tls_cert=self.tls_cert, tls_key=self.tls_key, chunk_bytes=self.chunk_bytes)

    def grpc_config(self):
        """What every gRPC client needs: token, trusted certificate (read here), chunk size."""
        from actors.grpc_source import GrpcConfig

        cert = self.root_cert or self.tls_cert
        root = None
        if cert is not None:
            try:
                root = Path(cert).read_bytes()
            except OSError as err:
                which = "root_cert" if self.root_cert else "tls_cert"
                raise ValueError(f"transport.{which}: cannot read {cert!r} ({err.strerror})") from None
        return GrpcConfig(token=self.token, root_cert=root, server_name=self.server_name, chunk_bytes=self.chunk_bytes)


@dataclass
class DecodersSpec:
    """``count`` Decoder actors, each asking Ray for ``num_gpus`` and ``resources``.

    ``max_restarts`` (-1: always): a decoder that dies is restarted by Ray, empty; the
    coordinator has already moved its requests and uses it again once it answers."""

    count: int = 1
    num_gpus: float = 0
    resources: dict = field(default_factory=lambda: {"decoder": 1})
    device: str = "cpu"
    max_batch_size: int = 16
    config: DecoderConfig = field(default_factory=lambda: DecoderConfig(mode="specmoe"))
    max_restarts: int = -1

    def __post_init__(self):
        _check_int(self.count, "decoders.count", 0)
        _check_int(self.max_restarts, "decoders.max_restarts", -1)
        _check_number(self.num_gpus, "decoders.num_gpus")
        _check_resources(self.resources, "decoders.resources")
        if not isinstance(self.device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"decoders.device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.device.startswith("cuda") and not self.num_gpus:
            raise ValueError(f"decoders.device is {self.device!r} but decoders.num_gpus is 0: Ray would hide every GPU "
                             "from the decoder; ask for num_gpus (e.g. 1)")
        _check_int(self.max_batch_size, "decoders.max_batch_size", 1)
        if not isinstance(self.config, DecoderConfig):
            raise ValueError(f"decoders.config must be a DecoderConfig, got {type(self.config).__name__}")


@dataclass
class CoordinatorSpec:
    """Admission and batching limits of the coordinator; ``journal``: its request journal file."""

    max_queue: int = 256
    max_batch_per_decoder: int = 16
    journal: str | None = None
    max_restarts: int = -1
    decoder_failures: int = 3  # consecutive failed rounds before a decoder is declared dead

    def __post_init__(self):
        _check_int(self.max_queue, "coordinator.max_queue", 1)
        _check_int(self.max_batch_per_decoder, "coordinator.max_batch_per_decoder", 1)
        if self.journal is not None and (not isinstance(self.journal, str) or not self.journal):
            raise ValueError(f"coordinator.journal must be a file path or null, got {self.journal!r}")
        _check_int(self.max_restarts, "coordinator.max_restarts", -1)
        _check_int(self.decoder_failures, "coordinator.decoder_failures", 1)


SECTIONS = {"model": ModelSpec, "stores": StoreSpec, "transport": TransportSpec, "decoders": DecodersSpec,
            "coordinator": CoordinatorSpec}


@dataclass
class DeploymentSpec:
    """Everything ``build_deployment`` needs; every field is checked when the spec is made."""

    name: str = "specmoe"
    namespace: str = "specmoe"
    model: ModelSpec = field(default_factory=ModelSpec)
    stores: StoreSpec = field(default_factory=StoreSpec)
    transport: TransportSpec = field(default_factory=TransportSpec)
    decoders: DecodersSpec = field(default_factory=DecodersSpec)
    coordinator: CoordinatorSpec = field(default_factory=CoordinatorSpec)

    def __post_init__(self):
        for key in ("name", "namespace"):
            value = getattr(self, key)
            if not isinstance(value, str) or not NAME.match(value):
                raise ValueError(f"{key} must be letters, digits, '_', '.' or '-' (not starting with a symbol), got {value!r}")
        for key, cls in SECTIONS.items():
            if not isinstance(getattr(self, key), cls):
                raise ValueError(f"{key} must be a {cls.__name__}, got {type(getattr(self, key)).__name__}")
        if self.decoders.count and self.coordinator.max_batch_per_decoder > self.decoders.max_batch_size:
            raise ValueError(f"coordinator.max_batch_per_decoder ({self.coordinator.max_batch_per_decoder}) must not exceed "
                             f"decoders.max_batch_size ({self.decoders.max_batch_size})")

    # -- files ------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> DeploymentSpec:
        """Read a spec from YAML (``.yaml``/``.yml``) or JSON (``.json``)."""
        path = Path(path)
        if path.suffix not in (".yaml", ".yml", ".json"):
            raise ValueError(f"deployment spec {str(path)!r}: use a .yaml, .yml or .json file")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"deployment spec {str(path)!r}: cannot read it ({err.strerror})") from None
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"deployment spec {str(path)!r} is not valid JSON: {err}") from None
        else:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as err:
                raise ValueError(f"deployment spec {str(path)!r} is not valid YAML: {err}") from None
        try:
            return cls.from_dict(data if data is not None else {})
        except ValueError as err:
            raise ValueError(f"deployment spec {str(path)!r}: {err}") from None

    @classmethod
    def from_dict(cls, data: dict) -> DeploymentSpec:
        """A spec from plain data; unknown keys are an error naming them."""
        top = _known(data, cls, "the deployment spec")
        for key, section in SECTIONS.items():
            if key in top:
                top[key] = _section(section, top[key], key)
        return cls(**top)

    def to_dict(self) -> dict:
        """Plain data (JSON and YAML safe) that ``from_dict`` reads back to an equal spec."""
        out = asdict(self)
        profile = out["decoders"]["config"]["profile"]
        out["decoders"]["config"]["profile"] = None if profile is None else str(profile)
        return out

    def save(self, path: str | Path) -> None:
        """Write the spec as YAML or JSON, by the file's suffix."""
        path = Path(path)
        if path.suffix == ".json":
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        else:
            raise ValueError(f"deployment spec {str(path)!r}: use a .yaml, .yml or .json file")

    # -- what the actors are given ----------------------------------------------------------

    def engine_config(self) -> EngineConfig:
        d = self.decoders
        return EngineConfig(model=self.model.path, dtype=self.model.dtype, device=d.device, max_batch_size=d.max_batch_size,
                            max_model_len=self.model.max_model_len, decoder=d.config)

    def store_name(self, i: int) -> str:
        return f"{self.name}-store-{i}"

    def decoder_name(self, i: int) -> str:
        return f"{self.name}-decoder-{i}"

    @property
    def coordinator_name(self) -> str:
        return f"{self.name}-coordinator"


def _known(data, cls, where: str) -> dict:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise ValueError(f"unknown keys in {where}: {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return dict(data)


def _section(cls, data, where: str):
    values = _known(data, cls, where)
    if cls is DecodersSpec and "config" in values and not isinstance(values["config"], DecoderConfig):
        values["config"] = _decoder_config(values["config"])
    return cls(**values)


def _decoder_config(data) -> DecoderConfig:
    values = _known(data, DecoderConfig, "decoders.config")
    try:
        return DecoderConfig(**values)
    except ValueError as err:
        raise ValueError(f"decoders.config: {err}") from None


# -- bringing it up ---------------------------------------------------------------------------


@dataclass
class StoreSet:
    """The ExpertStore actors of a deployment and which experts each holds."""

    names: list[str]
    namespace: str
    handles: list
    placement: Placement

    def health(self) -> list[dict]:
        import ray

        return ray.get([h.health.remote() for h in self.handles])

    @property
    def grpc_addresses(self) -> list[str | None]:
        """Where each store serves gRPC now (a restarted store listens on a new port)."""
        import ray

        return ray.get([h.grpc_address.remote() for h in self.handles])

    def source_spec(self, transport: TransportSpec):
        """What a decoder needs to build (and rebuild) its source over these stores."""
        from actors.decoder import SourceSpec

        grpc = transport.grpc_config() if transport.kind == "grpc" else None
        return SourceSpec(transport.kind, tuple(self.names), self.namespace, dict(self.placement.owners),
                          grpc=grpc, verify=transport.verify, link=transport.link)

    def ray_source(self, verify: bool = True):
        from actors.ray_source import RaySource

        return RaySource(self.handles, self.placement.owners, verify=verify)

    def grpc_source(self, cfg=None, verify: bool = True):
        from actors.grpc_source import GrpcSource

        addresses = self.grpc_addresses
        if None in addresses:
            raise ValueError("these stores were started without gRPC (transport.kind 'ray')")
        return GrpcSource(addresses, cfg, verify=verify, owners=self.placement.owners)


@dataclass
class Deployment:
    """What ``build_deployment`` brought up (or attached to)."""

    spec: DeploymentSpec
    stores: StoreSet
    decoders: list = field(default_factory=list)
    coordinator: object | None = None
    shards: Path | None = None  # the prepared directory the stores serve

    def source(self):
        """An in-process source over the stores, with the spec's transport (benchmarks, a driver-side engine);
        it carries the prepared directory's affinity table (``source.affinity``) for the hot draft policy."""
        source = self.stores.source_spec(self.spec.transport).build()
        if self.shards is not None and has_affinity(self.shards):
            source.affinity = load_affinity(self.shards)
        return source

    def shutdown(self, stores: bool = True, timeout_s: float = 30.0) -> None:
        """Stop the coordinator and decoders, and the stores unless ``stores=False``; returns once
        their names are free again (a new ``build_deployment`` then starts fresh actors)."""
        import ray

        s = self.spec
        names = ([s.coordinator_name] if self.coordinator is not None else []) + [s.decoder_name(i) for i in range(len(self.decoders))]
        handles = ([self.coordinator] if self.coordinator is not None else []) + list(self.decoders)
        if stores:
            names += self.stores.names
            handles += self.stores.handles
        for handle in handles:
            ray.kill(handle, no_restart=True)
        deadline = time.monotonic() + timeout_s
        while any(_named(n, s.namespace) for n in names) and time.monotonic() < deadline:
            time.sleep(0.1)


def build_deployment(spec: DeploymentSpec) -> Deployment:
    """Start or attach to the stores, decoders and coordinator that ``spec`` describes.

    Ray must be initialised (``ray.init(address=...)``, or a ``LocalCluster``). Shards are
    prepared on first use unless ``spec.model.shards`` names a prepared directory.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("build_deployment needs Ray: ray.init(address=...) first, or run inside a LocalCluster")
    if spec.model.shards is not None:
        shards = Path(spec.model.shards)
    else:
        from cluster.sources import prepared_dir

        shards = prepared_dir(spec.model.path)
    stores = _stores(spec, shards)
    decoders, started = [], []
    for i in range(spec.decoders.count):
        handle, new = _decoder(spec, i, stores, shards)
        decoders.append(handle)
        started += [handle] if new else []
    try:
        ray.get([d.health.remote() for d in decoders])  # raises here if a decoder failed to start
    except BaseException:
        for handle in started:  # the stores stay up: a corrected spec attaches to them
            ray.kill(handle, no_restart=True)
        raise
    coordinator = _coordinator(spec, decoders) if decoders else None
    return Deployment(spec, stores, decoders, coordinator, shards)


def _named(name: str, namespace: str):
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def expert_sizes(reader) -> dict[tuple[int, int], int]:
    from specmoe.shards import EXPERT_TENSORS

    return {key: sum(e["nbytes"] for e in reader.entries(*key) if e["name"] in EXPERT_TENSORS) for key in reader.keys()}


def _stores(spec: DeploymentSpec, shards: Path) -> StoreSet:
    import ray

    from actors.expert_store import store_actor
    from specmoe.shards import ShardReader

    reader = ShardReader(shards)
    s = spec.stores
    placement = plan_placement(expert_sizes(reader), s.count, s.replication)
    server = spec.transport.server_config()
    names = [spec.store_name(i) for i in range(s.count)]
    handles, started = [], []  # started: indices of the stores started here (the rest are attached)
    for i, (name, keys) in enumerate(zip(names, placement.stores)):
        handle = _named(name, spec.namespace)
        if handle is None:
            actor = store_actor(s.max_restarts).options(name=name, namespace=spec.namespace, lifetime="detached",
                                                        num_cpus=0, resources=dict(s.resources))
            handle = actor.remote(str(shards), sorted(keys), server, True)
            started.append(i)
        handles.append(handle)
    try:
        health = ray.get([h.health.remote() for h in handles])  # raises here if a store failed to start
        for i, (name, handle, keys, h) in enumerate(zip(names, handles, placement.stores, health)):
            if i not in started:
                _check_attached_store(name, handle, keys, h, reader.model, spec.transport)
    except BaseException:
        for i in started:
            ray.kill(handles[i], no_restart=True)
        raise
    return StoreSet(names, spec.namespace, handles, placement)


def _check_attached_store(name: str, handle, keys, health: dict, model: str, transport: TransportSpec) -> None:
    import ray

    if health["model"] != model:
        raise ValueError(f"store {name!r} serves model {health['model']}, not {model} (this spec's model); "
                         "shut that deployment down or give this one another name")
    held = {(e["layer"], e["expert"]) for e in ray.get(handle.manifest.remote())["entries"]}
    if held != set(keys):
        raise ValueError(f"store {name!r} holds another placement of the experts (started with other stores.count or "
                         "stores.replication); shut that deployment down or give this one another name")
    if transport.kind == "grpc" and health["grpc"] is None:
        raise ValueError(f"store {name!r} serves no gRPC (started for the ray transport); shut that deployment down "
                         "or use transport.kind 'ray'")


def _decoder(spec: DeploymentSpec, i: int, stores: StoreSet, shards: Path):
    import ray

    from actors.decoder import decoder_actor

    name, config = spec.decoder_name(i), _with_affinity(spec.engine_config(), shards)
    handle = _named(name, spec.namespace)
    if handle is not None:
        running = ray.get(handle.engine_config.remote())
        # the model is compared by fingerprint, not by path (a job's uploaded copy of a model has
        # another path each time): the stores attached above serve this spec's model, and a
        # decoder of this deployment was built against them
        if replace(running, model="") != replace(config, model=""):
            raise ValueError(f"decoder {name!r} runs another configuration than this spec's; shut that deployment "
                             "down or give this one another name")
        return handle, False
    d = spec.decoders
    source = stores.source_spec(spec.transport) if config.decoder.mode_spec.offloaded else None
    options = dict(name=name, namespace=spec.namespace, lifetime="detached", max_restarts=d.max_restarts, num_gpus=d.num_gpus,
                   resources=dict(d.resources), num_cpus=0 if d.resources or d.num_gpus else 1)
    return decoder_actor(**options).remote(config, source), True


def _with_affinity(config: EngineConfig, shards: Path) -> EngineConfig:
    """A hot-policy decoder gets the prepared directory's affinity table itself (a few KB), so
    it needs no access to the shards and moves no expert to compute it."""
    d = config.decoder
    if not (d.speculative and d.draft_policy == "hot" and d.affinity is None and has_affinity(shards)):
        return config
    return replace(config, decoder=replace(d, affinity=load_affinity(shards)))


def _coordinator(spec: DeploymentSpec, decoders: list):
    """The coordinator over ``decoders``, when ``actors.coordinator`` provides one."""
    try:
        from actors import coordinator as module
    except ModuleNotFoundError as err:
        if err.name != "actors.coordinator":
            raise
        return None
    make = getattr(module, "coordinator_actor", None)
    if make is None:
        return None
    existing = _named(spec.coordinator_name, spec.namespace)
    if existing is not None:
        return existing
    return make(name=spec.coordinator_name, namespace=spec.namespace, lifetime="detached",
                max_restarts=spec.coordinator.max_restarts).remote(decoders, spec.coordinator, spec.model.path)
