"""The TensorFlow engine: logical CPU replicas, determinism and the tf.distribute strategy.

Everything here must run before TensorFlow initializes its devices (before the first op), so the
entry point calls `configure_devices` first thing.
"""

import json
import os

import keras
import tensorflow as tf


STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


def add_device_arguments(group, strategies=STRATEGIES):
    """The command-line options `make_strategy` and `configure_devices` take."""
    group.add_argument("--strategy", choices=strategies, default="auto")
    group.add_argument("--tpu", help="TPU name or grpc:// address (implies --strategy tpu)")
    group.add_argument(
        "--cpu-replicas",
        type=int,
        default=0,
        help="split the CPU into N logical devices (MirroredStrategy without accelerators)",
    )


def configure_devices(cpu_replicas=0, seed=0, deterministic=False):
    """Splits the CPU into `cpu_replicas` logical devices and seeds every RNG.

    With several logical CPUs, MirroredStrategy runs (and can be tested) without accelerators.
    `deterministic` also turns on TensorFlow's op determinism.
    """
    if cpu_replicas and cpu_replicas > 1:
        cpus = tf.config.list_physical_devices("CPU")
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * cpu_replicas
        )
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def _cluster_spec():
    config = os.environ.get("TF_CONFIG")
    if not config:
        return {}, {}
    config = json.loads(config)
    return config.get("cluster", {}), config.get("task", {})


def make_strategy(kind="auto", tpu=None):
    """The tf.distribute strategy named `kind`.

    auto: TPU if `tpu` is given, multi_worker if TF_CONFIG names more than one task, mirrored if
    there are several GPUs or logical CPUs, else one_device (GPU 0 if any, else the CPU).
    """
    if kind not in STRATEGIES:
        raise ValueError(f"Unknown strategy {kind!r}. Available: {', '.join(STRATEGIES)}.")
    cluster, _ = _cluster_spec()
    if kind == "auto":
        if tpu:
            kind = "tpu"
        elif sum(len(tasks) for tasks in cluster.values()) > 1:
            kind = "multi_worker"
        elif len(_replica_devices()) > 1:
            kind = "mirrored"
        else:
            kind = "one_device"
    if kind == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if kind == "multi_worker":
        if not cluster:
            raise ValueError("--strategy multi_worker needs TF_CONFIG describing the cluster.")
        _configure_coordination(cluster)
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy(devices=_replica_devices())
    return tf.distribute.OneDeviceStrategy(_replica_devices()[0])


def _configure_coordination(cluster, heartbeat_timeout_s=300):
    """Sets up TF's coordination service as MultiWorkerMirroredStrategy would, with a longer
    heartbeat timeout: its 10 s default declares busy workers dead on loaded CPU-only hosts
    (the service runs inside worker 0, beside its input pipeline and training step)."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    jobs = [
        coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(cluster[job]))
        for job in ("chief", "worker")
        if job in cluster
    ]
    leader = f"/job:{'chief' if 'chief' in cluster else 'worker'}/replica:0/task:0"
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=leader,
        coordinated_jobs=jobs,
        heartbeat_timeout_in_ms=heartbeat_timeout_s * 1000,
    )


def _replica_devices():
    gpus = tf.config.list_logical_devices("GPU")
    devices = gpus or tf.config.list_logical_devices("CPU")
    return [d.name for d in devices]


def is_multi_worker(strategy):
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def is_chief(strategy):
    """Whether this process writes the run's outputs (always, except non-chief workers)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not is_multi_worker(strategy):
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and task_id == 0 and not has_chief


def worker_name(strategy):
    """A name for this process's private outputs ("chief", "worker-1", ...)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "chief"
    return f"{resolver.task_type}-{resolver.task_id}"


class Engine:
    """What the trainer needs to know of the TensorFlow engine's set-up (a tf.distribute
    strategy); `training.engine_jax.Engine` answers the same questions for JAX."""

    def __init__(self, strategy):
        self.strategy = strategy
        self.chief = is_chief(strategy)
        self.worker_name = worker_name(strategy)
        self.process_index, self.num_processes = 0, 1  # tf.distribute shards the datasets
        self.multi_worker = is_multi_worker(strategy)
        self.several_processes = self.multi_worker

    @property
    def replicas(self):
        return self.strategy.num_replicas_in_sync

    def describe(self):
        return f"{type(self.strategy).__name__}: {self.replicas} replica(s)"

    def scope(self):
        return self.strategy.scope()

    # tf.distribute's workers stop and resume together through its own coordination.
    agree = None

    def check_same_everywhere(self, value, what):
        """A no-op: each worker resumes from its own backup as tf.distribute expects."""

    def lost_process_message(self, error, seconds_since_step=None):
        """None: TensorFlow's collective errors already name the lost worker; they are left as
        they are."""
        return None

    def prepare(self, model, val_ds):
        """Readies a compiled model for `fit` under this strategy."""
        if self.multi_worker:
            from training import keras_internals

            keras_internals.patch_multi_worker_fit(model, val_ds.element_spec)


def start(args, seed, deterministic=False):
    """Configures TensorFlow's devices and seeds and returns the `Engine` of `--strategy`."""
    if args.cpu_replicas < 0:
        raise ValueError(f"--cpu-replicas must be >= 0, got {args.cpu_replicas}.")
    configure_devices(args.cpu_replicas, seed, deterministic)
    return Engine(make_strategy(args.strategy, args.tpu))
