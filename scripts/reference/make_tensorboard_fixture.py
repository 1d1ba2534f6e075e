"""Make Tests/QLoRACoreTests/Resources/tensorboard/: an event file written by PyTorch's SummaryWriter
(the writer transformers' TensorBoardCallback uses), for checking that ours writes the same bytes.

  events.out.tfevents.fixture  scalars (tags, values, steps, wall times in scalars.json) written with
                               torch.utils.tensorboard.SummaryWriter.add_scalar(..., walltime=...), plus
                               one SessionLog START at step 4 (what a resumed run writes), in that order.
  scalars.json                 the events, in order.

The first record (file_version "brain.Event:2") carries the wall time of the run, so it is checked by
its content, not its bytes. The script also reads the file back with tensorboard's EventAccumulator.
Run:  /work/refvenv/bin/python scripts/reference/make_tensorboard_fixture.py
"""

import glob
import json
import os
import shutil
import tempfile

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2
from torch.utils.tensorboard import SummaryWriter

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "Tests", "QLoRACoreTests", "Resources", "tensorboard")

EVENTS = [
    {"tag": "train/loss", "value": 2.8125, "step": 1, "wall_time": 1764000000.25},
    {"tag": "train/learning_rate", "value": 0.0002, "step": 1, "wall_time": 1764000000.25},
    {"tag": "train/grad_norm", "value": 0.123456789, "step": 1, "wall_time": 1764000000.5},
    {"tag": "train/loss", "value": -1.5e-7, "step": 2, "wall_time": 1764000001.0},
    {"tag": "eval/loss", "value": 3.25, "step": 300, "wall_time": 1764000002.125},
    {"tag": "train/tokens_per_second", "value": 98765.4321, "step": 123456789, "wall_time": 1764000003.0},
    {"session_log_start_step": 4, "wall_time": 1764000004.0},
    {"tag": "train/loss", "value": 1.0, "step": 5, "wall_time": 1764000005.0},
]


def main():
    tmp = tempfile.mkdtemp()
    w = SummaryWriter(log_dir=tmp)
    for e in EVENTS:
        if "session_log_start_step" in e:
            ev = event_pb2.Event(wall_time=e["wall_time"], step=e["session_log_start_step"])
            ev.session_log.status = event_pb2.SessionLog.START
            w._get_file_writer().add_event(ev, step=e["session_log_start_step"], walltime=e["wall_time"])
        else:
            w.add_scalar(e["tag"], e["value"], e["step"], walltime=e["wall_time"])
    w.close()
    (path,) = glob.glob(os.path.join(tmp, "events.out.tfevents.*"))
    os.makedirs(OUT, exist_ok=True)
    shutil.copy(path, os.path.join(OUT, "events.out.tfevents.fixture"))
    with open(os.path.join(OUT, "scalars.json"), "w") as f:
        json.dump(EVENTS, f, indent=1)
    acc = EventAccumulator(OUT)
    acc.Reload()
    # The START at step 4 purges train/loss at steps >= 4 written before it (none here).
    print({tag: [(s.step, s.value) for s in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
