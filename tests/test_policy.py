"""Policy: JSON round trip, atomic save, and clear errors for a policy from another model."""

from __future__ import annotations

import json

import pytest

from tofu_export.errors import UserError
from tofu_export.policy import Policy, PolicyError, model_record


@pytest.fixture(scope="module")
def vit(make_vit):
    return make_vit("vit_tiny_patch16_224", depth=4, img_size=64)  # 16 patches + 1 class token


def _policy(model, **changes) -> Policy:
    record = dict(model_record(model), **changes)
    return Policy(("prune", "mlerp", "mean", "mlerp"), (4, 2, 0, 1), record, {"images": {"count": 8}}, {"x": [1.0]})


def test_model_record_names_the_geometry(vit) -> None:
    record = model_record(vit)
    assert record == {"arch": "vit_tiny_patch16_224", "depth": 4, "embed_dim": 192, "num_prefix": 1,
                      "img_size": [64, 64], "tokens": 17}


def test_save_load_round_trip(vit, tmp_path) -> None:
    policy = _policy(vit)
    path = policy.save(tmp_path / "sub" / "policy.json")
    assert Policy.load(path) == policy
    data = json.loads(path.read_text())
    assert data["format"] == "tofu-export/policy" and data["modes"][0] == "prune" and data["r"] == [4, 2, 0, 1]
    assert not list(path.parent.glob(".*tmp"))  # no temp file left behind
    policy.check_fits(vit, 64)


def test_policy_error_is_a_user_error() -> None:
    assert issubclass(PolicyError, UserError)


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"depth": 12}, "blocks 4 \\(policy: 12\\)"),
        ({"tokens": 257}, "tokens entering block 0 17 \\(policy: 257\\)"),
        ({"num_prefix": 5}, "protected prefix tokens 1 \\(policy: 5\\)"),
        ({"embed_dim": 384}, "embedding width 192 \\(policy: 384\\)"),
    ],
)
def test_check_fits_names_what_differs(vit, changes, named) -> None:
    record = dict(model_record(vit), **changes)
    depth = record["depth"]
    policy = Policy(("mean",) * depth, (0,) * depth, record)
    with pytest.raises(PolicyError, match=named):
        policy.check_fits(vit)


def test_check_fits_names_the_input_size_and_hints_it(make_vit) -> None:
    model = make_vit("vit_tiny_patch16_224", depth=4, img_size=64, dynamic_img_size=True)
    policy = _policy(model)
    with pytest.raises(PolicyError, match=r"input size \[96, 96\] \(policy: \[64, 64\]\)") as caught:
        policy.check_fits(model, 96)
    assert caught.value.hint is not None and caught.value.hint.option == "img_size"
    assert caught.value.hint.value == "64"


@pytest.mark.parametrize(
    ("modes", "r", "message"),
    [
        (("mean",) * 3, (0,) * 4, "needs 4 modes and 4 r values"),
        (("merge",) * 4, (0,) * 4, "unknown reduce mode"),
        (("mean",) * 4, (0, -1, 0, 0), "int >= 0"),
        (("mean",) * 4, (9, 0, 0, 0), "block 0 to remove 9 tokens, but it receives 17"),
    ],
)
def test_malformed_policies_are_refused(vit, modes, r, message) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy(modes, r, model_record(vit))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not readable JSON"),
        ('{"modes": []}', "not a tofu-export policy"),
        ('{"format": "tofu-export/policy", "format_version": 99}', "version 99 is not supported"),
        ('{"format": "tofu-export/policy", "format_version": 1, "modes": []}', "incomplete or malformed"),
    ],
)
def test_load_refuses_bad_files(tmp_path, text, message) -> None:
    path = tmp_path / "policy.json"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        Policy.load(path)


def test_load_names_a_missing_file(tmp_path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        Policy.load(tmp_path / "nope.json")
