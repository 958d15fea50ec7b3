"""Knowledge distillation: the loss against hand computations and torch's kl_div, the T^2 scaling, the
teacher wired into the classification task (same inputs, run folder, exact resume), bad input."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cnnlab._errors import CnnlabError
from cnnlab.compress.distill import Teacher, distillation_loss, soft_target_loss
from cnnlab.data import datasets as D
from cnnlab.engine import train
from cnnlab.engine.config import TrainConfig, apply_overrides
from tests.engine._tiny import make_tiny, register_tiny, tiny_config


@pytest.fixture(autouse=True)
def _tiny(monkeypatch):
    register_tiny(monkeypatch)


def _logits(seed: int, batch: int = 5, classes: int = 4, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(batch, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ---- the loss -------------------------------------------------------------------------------------------
def test_loss_equals_a_hand_computation():
    s, t, y = _logits(0), _logits(1), torch.tensor([0, 3, 1, 2, 0])
    T, alpha = 3.0, 0.7
    p_teacher = [[math.exp(v / T) for v in row] for row in t.tolist()]
    p_teacher = [[v / sum(row) for v in row] for row in p_teacher]
    p_student = [[math.exp(v / T) for v in row] for row in s.tolist()]
    p_student = [[v / sum(row) for v in row] for row in p_student]
    kl = sum(q * math.log(q / p) for qs, ps in zip(p_teacher, p_student) for q, p in zip(qs, ps)) / len(y)
    ce = -sum(row[c] - math.log(sum(math.exp(v) for v in row)) for row, c in zip(s.tolist(), y.tolist())) / len(y)
    expected = alpha * T * T * kl + (1 - alpha) * ce
    got = distillation_loss(s.float(), t.float(), y, T, alpha)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_soft_term_is_t_squared_times_torch_kl_div_batchmean():
    s, t = _logits(2).float(), _logits(3).float()
    for T in (1.0, 4.0, 8.0):
        reference = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean") * T * T
        torch.testing.assert_close(soft_target_loss(s, t, T), reference, rtol=1e-5, atol=1e-6)
        y = torch.tensor([0, 1, 2, 3, 0])
        torch.testing.assert_close(distillation_loss(s, t, y, T, alpha=1.0), reference, rtol=1e-5, atol=1e-6)


def test_alpha_zero_is_plain_cross_entropy_with_hard_or_soft_labels():
    s, t = _logits(4).float(), _logits(5).float()
    y = torch.tensor([1, 0, 3, 2, 2])
    soft = F.one_hot(y, 4).float() * 0.6 + 0.1  # mixup-like soft labels, rows sum to 1
    for target in (y, soft):
        assert torch.equal(distillation_loss(s, t, target, 4.0, 0.0, label_smoothing=0.1),
                           F.cross_entropy(s, target, label_smoothing=0.1))
    mixed = distillation_loss(s, t, soft, 2.0, 0.5)  # soft labels in the CE term of a mixed loss
    expected = 0.5 * soft_target_loss(s, t, 2.0) + 0.5 * F.cross_entropy(s, soft)
    torch.testing.assert_close(mixed, expected)


def _soft_grad_norm(T: float, scaled: bool) -> float:
    s = _logits(6, batch=16, classes=10).float().requires_grad_(True)
    t = _logits(7, batch=16, classes=10).float()
    loss = soft_target_loss(s, t, T) / (1 if scaled else T * T)
    loss.backward()
    return s.grad.norm().item()


def test_t_squared_scaling_keeps_the_soft_gradient_magnitude():
    # Hinton et al. sec. 2: the soft gradients scale as 1/T^2; multiplied by T^2 their size barely moves
    scaled = [_soft_grad_norm(T, True) for T in (1.0, 4.0, 8.0)]
    unscaled = [_soft_grad_norm(T, False) for T in (1.0, 4.0, 8.0)]
    assert max(scaled) / min(scaled) < 4  # while T^2 spans 64x
    assert max(unscaled) / min(unscaled) > 16


def test_high_temperature_gradient_is_the_logit_matching_limit():
    # sec. 2.1: for large T and zero-mean logits, dC/dz_i -> (z_i - v_i) / (N T^2); times T^2 and per batch
    # of B samples: (z - v) / (K B)
    s = _logits(8, batch=6, classes=5).float()
    t = _logits(9, batch=6, classes=5).float()
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    s.requires_grad_(True)
    soft_target_loss(s, t, 1000.0).backward()
    torch.testing.assert_close(s.grad, (s.detach() - t) / (5 * 6), rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("T, alpha, what", [(0.0, 0.5, "temperature"), (-1.0, 0.5, "temperature"),
                                            (4.0, 1.5, "alpha"), (4.0, -0.1, "alpha")])
def test_bad_temperature_or_alpha_is_refused(T, alpha, what):
    s = _logits(0).float()
    with pytest.raises(CnnlabError, match=what):
        distillation_loss(s, s, torch.zeros(5, dtype=torch.long), T, alpha)
    config = TrainConfig()
    with pytest.raises(CnnlabError, match=what):
        apply_overrides(config, ["distill.teacher=runs/t", f"distill.temperature={T}", f"distill.alpha={alpha}"])
    with pytest.raises(CnnlabError, match=what):  # refused with or without a teacher
        apply_overrides(TrainConfig(), [f"distill.temperature={T}", f"distill.alpha={alpha}"])


def test_a_teacher_for_a_model_without_class_logits_is_refused():
    for model in ("conv_autoencoder", "deeplabv3"):
        with pytest.raises(CnnlabError, match=f"class logits.*{model} is a"):
            apply_overrides(TrainConfig(), [f"model.name={model}", "distill.teacher=runs/t"])


# ---- the teacher in the engine --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    import _pytest.monkeypatch

    mp = _pytest.monkeypatch.MonkeyPatch()
    register_tiny(mp)
    try:
        out = tmp_path_factory.mktemp("teacher")
        train(tiny_config(out, "teacher", epochs=2))
    finally:
        mp.undo()
    return out / "teacher"


def _student(tmp_path, teacher, name="student", epochs=2, T=2.0, alpha=0.7):
    config = tiny_config(tmp_path, name, epochs=epochs)
    config.model.name = "simple_cnn"
    config.distill.teacher, config.distill.temperature, config.distill.alpha = str(teacher), T, alpha
    return config


def test_teacher_reads_the_students_exact_batches_with_mixup_and_bf16(tmp_path, teacher_run, monkeypatch):
    from cnnlab.models import create_model

    seen_student, seen_teacher = [], []
    original = Teacher.logits

    def spy(self, images):
        seen_teacher.append(images.clone())
        assert not self.module.training and self.placement == (torch.device("cpu"), True)  # the student's NHWC
        out = original(self, images)
        assert not out.requires_grad
        return out

    monkeypatch.setattr(Teacher, "logits", spy)
    config = _student(tmp_path, teacher_run, epochs=1)
    config.data.mixup, config.amp = 0.4, "bf16"
    student = create_model("simple_cnn", num_classes=3, in_channels=1)
    student.register_forward_pre_hook(lambda m, args: seen_student.append(args[0].clone()) if m.training else None)
    result = train(config, model=student)  # a given model: the teacher is loaded at the first step
    assert len(seen_teacher) == len(seen_student) == 6  # 96 images / 16
    assert all(torch.equal(a, b) for a, b in zip(seen_teacher, seen_student))
    assert math.isfinite(result.history[0]["train_loss"])


def test_run_folder_records_the_teacher_and_resume_is_exact(tmp_path, teacher_run):
    class Interrupted(Exception):
        pass

    def stop_after_one(row):
        if row["epoch"] == 1:
            raise Interrupted

    straight = train(_student(tmp_path, teacher_run, "straight"))
    with pytest.raises(Interrupted):
        train(_student(tmp_path, teacher_run, "split"), callbacks=[stop_after_one])
    train(_student(tmp_path, teacher_run, "split"), resume=True)
    for name in ("last.safetensors", "last.state.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "split" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # bitwise on the CPU
    saved = json.loads((tmp_path / "split" / "config.json").read_text())
    assert saved["distill"] == {"teacher": str(teacher_run), "temperature": 2.0, "alpha": 0.7}
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert (results["teacher"], results["temperature"], results["alpha"]) == (str(teacher_run), 2.0, 0.7)
    assert results["teacher_checkpoint"] == "last"
    # the distilled student differs from one trained alone on the same seed (the teacher took part)
    alone = tiny_config(tmp_path, "alone", epochs=2)
    alone.model.name = "simple_cnn"
    plain = train(alone)
    assert plain.history[-1]["train_loss"] != straight.history[-1]["train_loss"]
    assert "teacher" not in json.loads((tmp_path / "alone" / "results.json").read_text())
    # a resume refuses another temperature, alpha or teacher
    for change in ({"T": 3.0}, {"alpha": 0.5}, {"teacher": tmp_path / "alone"}):
        with pytest.raises(CnnlabError, match=r"distill\.(temperature|alpha|teacher) \(saved"):
            train(_student(tmp_path, change.get("teacher", teacher_run), "split", epochs=2, T=change.get("T", 2.0),
                           alpha=change.get("alpha", 0.7)), resume=True)


def test_teacher_on_other_data_or_normalisation_is_refused(tmp_path, teacher_run, monkeypatch):
    config = _student(tmp_path, teacher_run, "other_norm")
    config.data.normalize = "none"
    with pytest.raises(CnnlabError, match=r"teacher .* data.normalize='standard' but the student uses "
                                          r"data.normalize='none'"):
        train(config)
    monkeypatch.setitem(D.DATASETS, "tiny_renamed", lambda root=None, download=False: make_tiny())
    config = _student(tmp_path, teacher_run, "other_data")
    config.data.name = "tiny_renamed"
    with pytest.raises(CnnlabError, match=r"trained on data 'tiny' but the student on 'tiny_renamed'"):
        train(config)
    config = _student(tmp_path, tmp_path / "missing", "no_teacher")
    with pytest.raises(CnnlabError, match=r"teacher .*missing.* does not exist"):
        train(config)
    assert not (tmp_path / "other_norm").exists() and not (tmp_path / "no_teacher").exists()


def test_cli_flags_map_to_the_distill_section(tmp_path):
    from cnnlab.cli.main import build_parser
    from cnnlab.cli.train import config_from_args

    teacher = tmp_path / "t"
    args = build_parser().parse_args(["train", "--model", "simple_cnn", "--data", "tiny", "--teacher", str(teacher),
                                      "--temperature", "2.5", "--alpha", "0.3", "--out-dir", str(tmp_path)])
    config = config_from_args(args)
    assert (config.distill.teacher, config.distill.temperature, config.distill.alpha) == (str(teacher.resolve()), 2.5, 0.3)
    defaults = config_from_args(build_parser().parse_args(["train", "--data", "tiny", "--out-dir", str(tmp_path)]))
    assert (defaults.distill.teacher, defaults.distill.temperature, defaults.distill.alpha) == (None, 4.0, 0.9)


def test_teacher_of_another_task_or_other_classes_is_refused(teacher_run, monkeypatch):
    from cnnlab.engine import runs

    teacher = Teacher.load(teacher_run)
    assert teacher.tag == "last" and not teacher.module.training
    assert not any(p.requires_grad for p in teacher.module.parameters())
    data = dict(teacher.data_config)
    with pytest.raises(CnnlabError, match=r"has classes \['tl', 'centre', 'br'\] but the student's data has "
                                          r"\['br', 'centre', 'tl'\]"):
        teacher.check_student_data("tiny", data, ["br", "centre", "tl"], teacher.input_shape, teacher.preprocess)
    with pytest.raises(CnnlabError, match=r"takes images of shape \(1, 12, 12\) but the student's data has \(1, 16, 16\)"):
        teacher.check_student_data("tiny", data, teacher.classes, (1, 16, 16), teacher.preprocess)
    shifted = dict(teacher.preprocess, mean=[m + 0.1 for m in teacher.preprocess["mean"]])
    with pytest.raises(CnnlabError, match="normalised its inputs with mean"):
        teacher.check_student_data("tiny", data, teacher.classes, teacher.input_shape, shifted)
    teacher.check_student_data("tiny", data, teacher.classes, teacher.input_shape, teacher.preprocess)  # the same: ok
    real = runs.load_run

    def as_segmentation(run_dir, tag=None):
        run = real(run_dir, tag)
        run.task = "segmentation"
        return run

    monkeypatch.setattr(runs, "load_run", as_segmentation)
    with pytest.raises(CnnlabError, match=r"is a segmentation run; distillation needs a teacher whose outputs are "
                                          r"class logits"):
        Teacher.load(teacher_run)
