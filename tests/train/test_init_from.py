import torch
from typer.testing import CliRunner

from tagmill.bundle import load_bundle
from tagmill.cli import app
from tagmill.dataset.importer import ImportOptions, import_dataset
from tagmill.models import create_classifier, pooling_of
from tagmill.bundle.as_start import starting_point
from tagmill.train.init_from import transfer_weights
from tests.conftest import make_colour_classes

TINY = ["--backbone", "test_efficientnet", "--no-pretrained", "--image-size", "48", "--batch-size", "8",
        "--workers", "0", "--frozen-epochs", "0", "--epochs", "1"]


def run(*args):
    result = CliRunner().invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    return result


def test_monthly_retrain_keeps_known_classes_and_adds_new_ones(colour_dataset, tmp_path):
    run("train", colour_dataset, "--out", str(tmp_path / "run1"), *TINY)
    run("export", str(tmp_path / "run1"), "--out", str(tmp_path / "bundle1"))
    old_model, old_meta = load_bundle(str(tmp_path / "bundle1"))

    # next month: blue is gone, yellow is new
    make_colour_classes(tmp_path / "src2", 16, classes=("green", "red", "yellow"))
    import_dataset(str(tmp_path / "src2"), str(tmp_path / "ds2"), ImportOptions(val_fraction=0.25))
    classes = ["green", "red", "yellow"]
    model = create_classifier("test_efficientnet", 3, pretrained=False, pooling=pooling_of(old_meta.model_kwargs))
    transfer = transfer_weights(model, starting_point(str(tmp_path / "bundle1")), classes)
    assert (transfer.kept, transfer.added, transfer.removed) == (["green", "red"], ["yellow"], ["blue"])
    old_head, new_head = old_model.get_classifier(), model.get_classifier()
    for new_row, name in enumerate(classes[:2]):
        old_row = old_meta.classes.index(name)
        assert torch.equal(new_head.weight[new_row], old_head.weight[old_row])
        assert new_head.bias[new_row] == old_head.bias[old_row]
    assert torch.count_nonzero(new_head.weight[2]) == 0  # yellow starts fresh
    body = [k for k in model.state_dict() if not k.startswith("classifier")]
    assert all(torch.equal(model.state_dict()[k], old_model.state_dict()[k]) for k in body)

    result = run("train", str(tmp_path / "ds2"), "--out", str(tmp_path / "run2"), "--init-from", str(tmp_path / "bundle1"),
                 "--workers", "0", "--frozen-epochs", "0", "--epochs", "1", "--batch-size", "8", "--no-pretrained")
    assert "2 classes kept their head rows; 1 new (yellow); 1 dropped (blue)" in result.output
    config = (tmp_path / "run2" / "config.json").read_text()
    assert '"backbone": "test_efficientnet"' in config and '"image_size": 48' in config
