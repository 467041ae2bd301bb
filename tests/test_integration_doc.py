"""The example in docs/INTEGRATION.md runs as printed (the three-line plug-in)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from flwr.simulation import run_simulation

DOC = Path(__file__).resolve().parents[1] / "docs" / "INTEGRATION.md"


def example_source() -> str:
    blocks = re.findall(r"```python example\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/INTEGRATION.md must hold exactly one ```python example block"
    return blocks[0]


def test_integration_example_runs(monkeypatch):
    ray_tmp = Path("/tmp") / f"rayd{os.getpid()}"
    ray_tmp.mkdir(exist_ok=True)
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    namespace: dict = {"__name__": "integration_example"}
    exec(compile(example_source(), str(DOC), "exec"), namespace)
    try:
        run_simulation(server_app=namespace["server_app"], client_app=namespace["client_app"], num_supernodes=2,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    results = namespace["results"]
    assert "global-r2" in results["affected"]
    assert set(results["versions"]) == set(results["affected"])
    assert (namespace["STORE"] / "lineage").is_dir()
