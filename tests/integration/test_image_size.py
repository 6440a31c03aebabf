"""The lite image's estimated compressed size: under the seed's 200 MB, and the figure
README.md gives. Slow (a virtualenv of pyproject's pins, then gzip): about a minute."""

from __future__ import annotations

import pytest

from clawdbot.devtools import image_size
from tests.support import REPO_ROOT

# README's figure is rounded to the megabyte; wheels of the same pins vary a little.
README_TOLERANCE_MB = 3.0


@pytest.fixture(scope="module")
def estimate() -> image_size.Estimate:
    return image_size.estimate()


def test_lite_image_is_under_the_target(estimate: image_size.Estimate) -> None:
    assert estimate.total_bytes < image_size.TARGET_BYTES, estimate.report()
    # What the final stage copies was measured, not assumed.
    assert set(estimate.layers) == {"--from=venv-lite /opt/venv", "--from=app /app"}
    # The virtualenv holds Envoy's binary (about 107 MB unpacked): it cannot be small.
    assert estimate.layers["--from=venv-lite /opt/venv"] > 40_000_000
    assert estimate.base_bytes == image_size.BASE_IMAGE.compressed_bytes


def test_readme_states_the_estimate(estimate: image_size.Estimate) -> None:
    stated = image_size.readme_figure((REPO_ROOT / "README.md").read_text())
    assert abs(stated - estimate.total_mb) <= README_TOLERANCE_MB, (
        f"README.md says {stated} MB, the estimate is {estimate.total_mb:.1f} MB: "
        "run `python -m clawdbot.devtools.image_size --update-readme`"
    )
