"""The stage charts stand on their own: real files generated from one source (no drift), a README per
chart listing every value, and `helm package` giving an archive that renders with nothing else."""

from __future__ import annotations

import re
import sys
import tarfile

import pytest
import yaml
from chart_render import CHARTS, RECIPE, STAGES, helm

sys.path.insert(0, str(CHARTS))
import build  # noqa: E402  (charts/build.py: the generator under test)


def test_generated_files_are_current():
    assert build.build(check=True) == [], "run `make charts` (python charts/build.py) and commit the result"


def test_charts_hold_no_symlinks():
    assert not [str(p) for p in CHARTS.rglob("*") if p.is_symlink()]


@pytest.mark.parametrize("stage", STAGES)
def test_readme_documents_every_value_with_its_default(stage):
    chart = CHARTS / f"safealign-{stage}"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    readme = (chart / "README.md").read_text()
    for path, value in build._leaves(values):
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{'.'.join(path)}` |")), None)
        assert row is not None, path
        assert f"`{build.json.dumps(value)}`" in row.replace("\\|", "|"), (path, row)
        assert row.rstrip(" |").rsplit("|", 1)[1].strip(), f"{path}: no description (comment it in stage-values.yaml)"
        cells = re.split(r"(?<!\\)\|", row.strip().strip("|"))
        assert len(cells) == 4, f"{path}: {len(cells)} cells, a '|' in the text is not escaped: {row}"


def test_stage_defaults_differ_where_the_stages_do():
    gpus = {s: yaml.safe_load((CHARTS / f"safealign-{s}" / "values.yaml").read_text())["resources"]["gpusPerNode"]
            for s in STAGES}  # fmt: skip
    assert gpus["eval"] == 1 and gpus["align"] == 8
    assert "sweep" in yaml.safe_load((CHARTS / "safealign-sweep" / "values.yaml").read_text())
    assert "sweep" not in yaml.safe_load((CHARTS / "safealign-align" / "values.yaml").read_text())


@pytest.mark.parametrize("stage", STAGES)
def test_helm_package_is_self_contained(stage, tmp_path):
    archive = helm.package(CHARTS / f"safealign-{stage}", destination=tmp_path)
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    root = f"safealign-{stage}"
    assert {f"{root}/values.yaml", f"{root}/values.schema.json", f"{root}/README.md",
            f"{root}/charts/safealign-common/templates/_job.tpl", f"{root}/templates/job.yaml"} <= set(names)  # fmt: skip
    assert not [n for n in names if n.startswith((f"{root}/tests/", f"{root}/ci/"))]  # .helmignore
    chart = helm.Chart.load_archive(open(archive, "rb").read())  # the archive alone: no repository around it
    rendered = chart.render({"recipe": RECIPE, **({"sweep": {"part": "all"}} if stage == "sweep" else {})},
                            name="demo", namespace="ml")  # fmt: skip
    documents = [d for path, text in rendered.items() if not path.endswith("NOTES.txt") for d in yaml.safe_load_all(text)]
    kinds = {doc["kind"] for doc in documents if doc}
    assert {"Job", "ConfigMap", "PersistentVolumeClaim"} <= kinds


@pytest.mark.parametrize("stage", STAGES)
def test_lint_strict_with_the_ci_values(stage):
    """What chart-testing's `ct lint` does: `helm lint --strict` with each `ci/*-values.yaml`."""
    chart = CHARTS / f"safealign-{stage}"
    cases = sorted((chart / "ci").glob("*-values.yaml"))
    assert cases
    for values in cases:
        report = helm.lint(chart, yaml.safe_load(values.read_text()), strict=True)
        assert not report["errors"], (values, report)
        assert not [m for m in report["messages"] if m["severity"] >= 2], (values, report["messages"])
