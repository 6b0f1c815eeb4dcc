"""What a Train run's controller has to import before it starts the workers.

Ray Train's controller unpickles ``train_loop_config`` (``WorkerInputs``) first thing. When ``WorkerInputs`` lived
beside the training function, that pulled torchvision, scikit-learn and the whole worker module into every run's
controller: about 2.6 s on 2 CPUs, on the critical path of every run, sweep trial and nightly cycle.
"""

import subprocess
import sys

from ray import cloudpickle

from dermray.config import load_config
from dermray.models.identity import ModelIdentity
from dermray.ops.tracking import EpochLogger
from dermray.train.inputs import WorkerInputs

HEAVY = ("torchvision", "sklearn", "mlflow", "dermray.train.worker", "dermray.models.checkpoint")


def test_unpickling_the_worker_inputs_imports_no_model_or_metrics_library():
    config = load_config(None, ["model.backbone=small_cnn"])
    # With an MLflow run's epoch logger too, as a tracked run passes it.
    inputs = WorkerInputs(identity=ModelIdentity.of(config, ["mel", "nv"], "ham10000"), train_rows=48,
                          epoch_observers=[EpochLogger("http://127.0.0.1:5000", "0" * 32).log])
    probe = ("import pickle, sys; inputs = pickle.loads(sys.stdin.buffer.read())[\"inputs\"]; "
             f"print(inputs.identity.classes, [m for m in {HEAVY!r} if m in sys.modules])")
    # Serialised as Ray does it (cloudpickle); read back as the controller does, in a fresh process.
    result = subprocess.run([sys.executable, "-c", probe], input=cloudpickle.dumps({"inputs": inputs}),
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert result.stdout.decode().strip() == "['mel', 'nv'] []"
