"""Reads every TensorBoard event file under a folder with TensorBoard's own code and prints what it holds
as JSON, for tests/training.rs: {run folder: {"records": n, "scalars": {tag: [[step, value]]},
"texts": {tag: [[step, text]]}, "hparams": {name: value}, "hparam_types": {name: type}, "metrics": [...]}}.

Every record's checksums are verified (the strict reader raises on a bad one; TensorBoard's loader would
stop quietly instead)."""

import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2


def strict_records(path):
    reader = PyRecordReader_New(path)
    events = []
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return events
        events.append(event_pb2.Event.FromString(reader.record()))


def read_run(folder):
    files = sorted(f for f in os.listdir(folder) if "tfevents" in f)
    records = [e for f in files for e in strict_records(os.path.join(folder, f))]
    if records and records[0].file_version != "brain.Event:2":
        raise SystemExit(f"{folder}: first event is not a file version: {records[0]}")
    acc = event_accumulator.EventAccumulator(folder, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    out = {"records": len(records), "scalars": {}, "texts": {}, "hparams": {}, "hparam_types": {},
           "metrics": []}
    for tag in tags["scalars"]:
        out["scalars"][tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
    for tag in tags["tensors"]:
        meta = acc.SummaryMetadata(tag)
        if meta.plugin_data.plugin_name == "text":
            out["texts"][tag] = [[e.step, e.tensor_proto.string_val[0].decode()] for e in acc.Tensors(tag)]
    try:
        hparams = acc.PluginTagToContent("hparams")
    except KeyError:
        hparams = {}
    for tag, content in hparams.items():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        kind = data.WhichOneof("data")
        if kind == "session_start_info":
            for name, value in data.session_start_info.hparams.items():
                out["hparams"][name] = getattr(value, value.WhichOneof("kind"))
        elif kind == "experiment":
            for info in data.experiment.hparam_infos:
                out["hparam_types"][info.name] = api_pb2.DataType.Name(info.type)
            out["metrics"] = [m.name.tag for m in data.experiment.metric_infos]
        elif kind == "session_end_info":
            out["status"] = api_pb2.Status.Name(data.session_end_info.status)
    return out


def main():
    root = sys.argv[1]
    runs = {}
    for folder, _, files in sorted(os.walk(root)):
        if any("tfevents" in f for f in files):
            runs[os.path.relpath(folder, root)] = read_run(folder)
    json.dump(runs, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
