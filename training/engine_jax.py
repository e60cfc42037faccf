"""The JAX engine: data parallelism with `keras.distribution` over local devices and processes.

One process uses all its local devices (`keras.distribution.DataParallel`, the weights
replicated, each global batch split over the devices). Several processes (on one or several
hosts) join through JAX's distributed runtime, set up as `keras.distribution.initialize` sets it
up, from the flags `--coordinator-address`, `--num-processes`, `--process-id` or Keras'
variables `KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES`,
`KERAS_DISTRIBUTION_PROCESS_ID`; every process runs the same command line. Each process feeds
its own slice of every global batch (`training.data` builds only that slice), and Keras
assembles the global batch over the device mesh.

A process that dies is noticed by the others through the distributed runtime: a collective
with the dead peer fails, or the coordination service misses its heartbeats for
`--heartbeat-timeout` seconds; the survivors then stop with an error instead of waiting for
ever.

Host CPU devices (`--cpu-replicas N`) and the collectives between processes on CPUs must be
configured before JAX initializes its backends, so `start` is called before any computation.
"""

import contextlib
import dataclasses
import os
import re

DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # JAX's default

# What JAX's distributed runtime says when a peer process is gone (measured with JAX 0.10 on
# CPUs): a collective whose connection the dead peer closed ("Gloo all-reduce failed: ...
# Connection closed by peer", raised as ValueError), or the coordination service's verdict after
# the heartbeat timeout ("Task 1 heartbeat timeout", "tasks are unhealthy (stopped sending
# heartbeats): 1").
LOST_PEER_TEXTS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "heartbeat timeout",
    "stopped sending heartbeats",
)
LOST_PEER_INDEX = re.compile(
    r"Task (\d+) heartbeat timeout|stopped sending heartbeats\):\s*(\d+)"
)


def add_process_arguments(group):
    """The command-line options of a multi-process run (JAX engine)."""
    group.add_argument(
        "--coordinator-address",
        help="JAX engine, several processes: HOST:PORT of process 0's coordination service "
        "(or KERAS_DISTRIBUTION_JOB_ADDRESSES)",
    )
    group.add_argument(
        "--num-processes",
        type=int,
        help="JAX engine: how many processes take part (or KERAS_DISTRIBUTION_NUM_PROCESSES)",
    )
    group.add_argument(
        "--process-id",
        type=int,
        help="JAX engine: this process's index, 0 .. N-1 (or KERAS_DISTRIBUTION_PROCESS_ID)",
    )
    group.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=DEFAULT_HEARTBEAT_TIMEOUT_S,
        metavar="SECONDS",
        help="JAX engine: a process silent this long is declared dead and the others stop",
    )


@dataclasses.dataclass
class Engine:
    """What the trainer needs to know of the JAX engine's set-up."""

    distribution: object  # keras.distribution.DataParallel; None for one device in one process
    process_index: int
    num_processes: int

    @property
    def replicas(self):
        if self.distribution is None:
            return 1
        return len(self.distribution.device_mesh.devices.flatten())

    @property
    def chief(self):
        return self.process_index == 0

    @property
    def several_processes(self):
        return self.num_processes > 1

    @property
    def worker_name(self):
        return f"process-{self.process_index}"

    def describe(self):
        if self.distribution is None:
            return "JAX: 1 device, no distribution"
        processes = f" in {self.num_processes} processes" if self.num_processes > 1 else ""
        return f"JAX DataParallel: {self.replicas} device(s){processes}"

    def scope(self):
        if self.distribution is None:
            return contextlib.nullcontext()
        return self.distribution.scope()

    def prepare(self, model, val_ds):
        """Nothing to do: Keras' JAX trainer distributes `fit` itself."""

    @property
    def agree(self):
        """For several processes, how they agree to stop at the same step (a process that stops
        alone leaves the others waiting in the next collective)."""
        from training import faults

        return faults.any_process_on_jax if self.num_processes > 1 else None

    def lost_process_message(self, error, seconds_since_step=None):
        """For an exception that `fit` raised because another process of the job stopped (JAX's
        distributed-runtime error), the one `error:` line that says so, with JAX's text after it;
        None for any other exception. `seconds_since_step`: time since this process's last
        training step ended."""
        import jax

        if self.num_processes == 1:
            return None
        if not isinstance(error, (jax.errors.JaxRuntimeError, ValueError)):
            return None
        text = str(error)
        if not any(marker in text for marker in LOST_PEER_TEXTS):
            return None
        found = LOST_PEER_INDEX.search(text)
        who = f"process {found.group(1) or found.group(2)}" if found else "a process"
        when = (
            f"; this process's last training step ended {seconds_since_step:.1f} s before the "
            "error"
            if seconds_since_step is not None
            else ", before this process's first training step"
        )
        return (
            f"error: another process of this job stopped ({who} of {self.num_processes}, "
            f"according to JAX's distributed runtime{when}), so process {self.process_index} "
            "stopped too. Rerun the same command on every process to resume from the last "
            "backup. JAX's error:\n" + text.strip()
        )

    def check_same_everywhere(self, value, what):
        """Raises if the integers `value` differ between processes (e.g. the step each would
        resume from); a no-op for one process."""
        if self.num_processes == 1:
            return
        from jax.experimental import multihost_utils
        import numpy as np

        values = np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int64)))
        if not (values == values[0]).all():
            listing = ", ".join(f"process {i}: {v.tolist()}" for i, v in enumerate(values))
            raise ValueError(
                f"The processes disagree on {what} ({listing}); every process must start from "
                "the same state."
            )


def process_settings(args, environ=os.environ):
    """(coordinator address, number of processes, process id) from the flags, else Keras'
    KERAS_DISTRIBUTION_* variables; (None, 1, 0) for a single process. ValueError names what is
    missing or out of range."""
    address = args.coordinator_address or environ.get("KERAS_DISTRIBUTION_JOB_ADDRESSES")
    count = args.num_processes
    index = args.process_id

    def number(name):
        value = environ.get(name)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}.") from None

    count = count if count is not None else number("KERAS_DISTRIBUTION_NUM_PROCESSES")
    index = index if index is not None else number("KERAS_DISTRIBUTION_PROCESS_ID")
    if address and "," in address:  # Keras' list of every job's address: the first coordinates
        addresses = address.split(",")
        if count is not None and count != len(addresses):
            raise ValueError(
                f"KERAS_DISTRIBUTION_JOB_ADDRESSES names {len(addresses)} jobs but the number "
                f"of processes is {count}."
            )
        address, count = addresses[0], len(addresses)
    if count is None or count == 1:
        return None, 1, 0
    if count < 1:
        raise ValueError(f"--num-processes must be >= 1, got {count}.")
    if not address or index is None:
        raise ValueError(
            f"A run of {count} processes needs --coordinator-address HOST:PORT and --process-id "
            "on every process (or the KERAS_DISTRIBUTION_* variables)."
        )
    if not 0 <= index < count:
        raise ValueError(f"--process-id must be in [0, {count - 1}], got {index}.")
    return address, count, index


def start(args, seed, deterministic=False):
    """Configures JAX (host devices, processes, seeds) and returns the `Engine`.

    `args` carries the device and process options (`--cpu-replicas`, `--coordinator-address`,
    ...). With `deterministic`, XLA's CPU and GPU kernels are asked for reproducible results.
    """
    address, count, index = process_settings(args)
    if args.cpu_replicas < 0:
        raise ValueError(f"--cpu-replicas must be >= 0, got {args.cpu_replicas}.")
    if args.strategy != "auto" or args.tpu:
        raise ValueError(
            "--strategy and --tpu choose a tf.distribute strategy (TensorFlow engine); the JAX "
            "engine uses every local device and the processes given by --num-processes."
        )
    if args.cpu_replicas and args.cpu_replicas > 1:
        flag = f"--xla_force_host_platform_device_count={args.cpu_replicas}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    if deterministic:
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true".strip()
        )
    import jax
    import keras
    import tensorflow as tf

    # TensorFlow only runs the input pipelines here: keep it off the accelerators JAX uses.
    tf.config.set_visible_devices([], "GPU")
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    if count > 1:
        # CPUs need an implementation of cross-process collectives; accelerators bring theirs.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # JAX's preemption service would take SIGTERM for itself; training.faults turns it into
        # a backup and a clean stop, agreed between the processes.
        jax.config.update("jax_enable_preemption_service", False)
        # keras.distribution.initialize(address, count, index) with a heartbeat timeout: Keras
        # passes none, and JAX's default leaves survivors waiting 100 s for a dead process.
        jax.distributed.initialize(
            coordinator_address=address,
            num_processes=count,
            process_id=index,
            heartbeat_timeout_seconds=args.heartbeat_timeout,
        )
    keras.utils.set_random_seed(seed)
    if len(jax.devices()) == 1:
        # One device needs no distribution, and DataParallel over one device costs two extra
        # compilations of the train step and one of the test step, plus one more at each epoch's
        # start (Keras 3.15, JAX 0.10): Keras keeps a new variable's or a reset metric's
        # single-device array as it is (its sharding "is equivalent" to the one-device mesh's),
        # the step returns mesh-sharded arrays, and JAX's cache keys tell the two apart.
        return Engine(None, 0, 1)
    # Each process builds its own slice of the global batch (training.data), so Keras must not
    # shard the datasets again.
    distribution = keras.distribution.DataParallel(
        devices=jax.devices(), auto_shard_dataset=False
    )
    keras.distribution.set_distribution(distribution)
    return Engine(distribution, jax.process_index(), jax.process_count())

