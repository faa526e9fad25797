from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
EXPECTED = {  # file: (distributed type, processes, machines, precision, cpu)
    "cpu.yaml": ("NO", 1, 1, "no", True),
    "cpu-bf16.yaml": ("NO", 1, 1, "bf16", True),
    "cpu-2proc.yaml": ("MULTI_GPU", 2, 1, "no", True),
    "gpu.yaml": ("NO", 1, 1, "no", False),
    "gpu-fp16.yaml": ("NO", 1, 1, "fp16", False),
    "gpu-bf16.yaml": ("NO", 1, 1, "bf16", False),
    "multi-gpu.yaml": ("MULTI_GPU", 8, 1, "no", False),
    "multi-gpu-fp16.yaml": ("MULTI_GPU", 8, 1, "fp16", False),
    "multi-gpu-bf16.yaml": ("MULTI_GPU", 8, 1, "bf16", False),
    "multi-node.yaml": ("MULTI_GPU", 16, 2, "bf16", False),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_with_accelerates_loader(name):
    config = load_config_from_file(str(LAUNCH / name))
    kind, processes, machines, precision, cpu = EXPECTED[name]
    assert config.distributed_type.value == kind
    assert (config.num_processes, config.num_machines, str(config.mixed_precision), config.use_cpu) == (
        processes, machines, precision, cpu)


def test_every_config_is_covered():
    assert {p.name for p in LAUNCH.glob("*.yaml")} == set(EXPECTED)
