"""ONNX Runtime's thread pools in a process confined to some CPUs (``taskset``, a container's
cpuset): one thread per allowed CPU, all of them on those CPUs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHILD = """
import os, sys
os.sched_setaffinity(0, {int(sys.argv[1])})
from loc3r.runtime.ort import session_options, open_session
import onnx
from onnx import helper, TensorProto
graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "g",
    [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 64]) for n in "ab"],
    [helper.make_tensor_value_info("c", TensorProto.FLOAT, [64, 64])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 9
path = sys.argv[2]
onnx.save(model, path)
sessions = [open_session(path) for _ in range(3)]
print(session_options().intra_op_num_threads)
print(sorted({open(f"/proc/self/task/{t}/status").read().split("Cpus_allowed_list:")[1].split()[0] for t in os.listdir("/proc/self/task")}))
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs a machine with 2 or more CPUs to confine a process to one")
def test_a_confined_process_gets_one_thread_per_allowed_cpu_on_those_cpus(tmp_path) -> None:  # noqa: ANN001
    """Without the rule ONNX Runtime sizes each session's pool by the machine and pins its
    threads to the other CPUs (seen: 6 threads on CPU 1 in a loc3r-run confined to CPU 0).

    Mutation checked: ``confined_threads`` returning None puts pool threads on another CPU
    (the set of CPUs seen by the threads is then not just the allowed one)."""
    cpu = min(os.sched_getaffinity(0))
    done = subprocess.run([sys.executable, "-c", CHILD, str(cpu), str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    threads, cpus = done.stdout.split("\n")[:2]
    assert threads == "1"
    assert cpus == f"['{cpu}']"


def test_an_unconfined_process_keeps_onnx_runtimes_choice() -> None:
    from loc3r.runtime.ort import confined_threads, session_options

    if len(os.sched_getaffinity(0)) < (os.cpu_count() or 1):
        pytest.skip("this test process is itself confined")
    assert confined_threads() is None
    assert session_options().intra_op_num_threads == 0
    assert session_options(threads=3).intra_op_num_threads == 3
