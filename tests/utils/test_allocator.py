"""The allocator tuning keeps freed large blocks: re-allocating them costs no page faults."""

import json
import subprocess
import sys

import pytest

from dinov2.utils import allocator

# Repeats an allocation pattern like one decoder pass (56, 113, 56 and 64 MB tensors, every page
# touched, then freed) eight times and prints the minor page faults of the last three rounds: the
# heap needs a few rounds to settle (glibc places 64-byte-aligned blocks in freed holes only once
# neighbouring holes have merged), after which a tuned process re-uses its freed blocks.
PROBE = """
import json, resource, sys, torch
from dinov2.utils.allocator import tune_cpu_allocator
applied = tune_cpu_allocator(enable=sys.argv[1] == "on")
MB = 1024 * 1024 // 4
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(56 * MB).fill_(1.0)
    b = torch.empty(113 * MB).fill_(1.0)
    del a
    c = torch.empty(56 * MB).fill_(1.0)
    del b, c
    d = torch.empty(64 * MB).fill_(1.0)
    del d
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": sum(faults[-3:])}))
"""


def probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(allocator._glibc() is None, reason="mallopt tuning applies to glibc only")
def test_freed_large_blocks_are_reused_without_page_faults():
    off, on = probe("off"), probe("on")
    assert not off["applied"] and on["applied"]
    # Untuned, every tensor is a fresh mmap: 289 MB of pages faulted in per round (at least one
    # fault per 2 MiB even with huge pages). Tuned, the freed blocks are reused: (almost) none.
    assert off["faults"] >= 3 * 289 // 2
    assert on["faults"] * 10 < off["faults"]


def test_environment_switch_disables(monkeypatch):
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert allocator.tune_cpu_allocator() is False
