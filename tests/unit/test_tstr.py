"""Train on synthetic, test on real (fedrun/eval/tstr.py): the classifier it trains reaches high
accuracy on the held-out digits from real training digits and chance from noise with random
labels, the scores are seeded, unconditional samples are labelled by the digits classifier, and
eval.tstr is refused where it cannot work. Real training, nothing mocked (~1 min)."""

import numpy as np
import pytest
import torch

from conftest import tiny
from fedrun.config import load_config
from fedrun.errors import ConfigError, EvaluationError
from fedrun.eval.tstr import TSTR, accuracy, build_tstr, train_classifier


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as a CPU rank runs (two threads on a busy 2-core machine are many times slower)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    """(train images, train labels, held-out images, held-out labels) of the default digits at 16x16."""
    from fedrun.eval.classifier import training_split

    train, heldout = training_split()
    everything = lambda data: data.get_batch(np.arange(len(data)))  # noqa: E731
    return (everything(train), torch.as_tensor(train.labels), everything(heldout),
            torch.as_tensor(heldout.labels))


def _pool(images, labels, name="digits"):
    from fedrun.data.base import ImageDataset

    return ImageDataset.from_tensor(images, labels=None if labels is None else labels.numpy(), name=name)


@pytest.fixture(scope="module")
def scorer(digits):
    from fedrun.eval.classifier import load_digits_classifier

    train_x, train_y, test_x, test_y = digits
    return TSTR(test_x, test_y.numpy(), _pool(train_x, train_y), 10, seed=0,
                labeller=load_digits_classifier())


def test_a_classifier_trained_on_real_digits_reads_the_held_out_digits(digits):
    train_x, train_y, test_x, test_y = digits
    model = train_classifier(train_x[:1000], train_y[:1000], 10, seed=0)
    assert accuracy(model, test_x, test_y) > 0.9


def test_a_classifier_trained_on_noise_with_random_labels_is_at_chance(digits):
    _, _, test_x, test_y = digits
    generator = torch.Generator().manual_seed(1)
    noise = torch.rand((1000, 1, 16, 16), generator=generator) * 2 - 1
    labels = torch.randint(0, 10, (1000,), generator=generator)
    model = train_classifier(noise, labels, 10, seed=0)
    assert accuracy(model, test_x, test_y) < 0.25  # 10 classes of ~18 held-out images each


def test_unconditional_real_digits_score_near_the_train_on_real_anchor(digits, scorer):
    train_x, train_y, _, _ = digits
    state = torch.random.get_rng_state()
    record = scorer.report(train_x[-600:])  # labelled by the digits classifier
    assert torch.equal(torch.random.get_rng_state(), state)  # the global stream is untouched
    assert record["tstr_labels"] == "digits_classifier" and record["tstr_samples"] == 600
    assert record["tstr_accuracy"] > 0.85 and record["trtr_accuracy"] > 0.85
    assert 0.1 <= record["tstr_chance"] < 0.15  # the most frequent held-out class
    assert scorer.score(train_x[:200], train_y[:200]) == scorer.score(train_x[:200], train_y[:200])


def test_conditioning_labels_are_what_the_classifier_learns(digits, scorer):
    train_x, train_y, _, _ = digits
    shuffled = train_y[-600:][torch.randperm(600, generator=torch.Generator().manual_seed(0))]
    right = scorer.report(train_x[-600:], train_y[-600:].numpy())
    wrong = scorer.report(train_x[-600:], shuffled.numpy())
    assert right["tstr_labels"] == "conditioning"
    assert right["tstr_accuracy"] > 0.85 and wrong["tstr_accuracy"] < 0.3
    with pytest.raises(EvaluationError, match="outside the 10 classes"):
        scorer.report(train_x[:4], np.array([0, 1, 2, 10]))


def test_unlabelled_held_out_images_are_refused_naming_the_key(digits):
    from fedrun.config import EvalConfig

    train_x, train_y, test_x, _ = digits
    with pytest.raises(ConfigError, match=r"config key 'eval.tstr'.*held-out images of data "
                                          r"source 'photos' have no labels"):
        build_tstr(EvalConfig(tstr=True), _pool(train_x, train_y), _pool(test_x, None, "photos"))


def test_unlabelled_samples_off_the_digits_are_refused(digits):
    _, _, test_x, test_y = digits
    scorer = TSTR(test_x, test_y.numpy(), _pool(test_x, test_y), 10, seed=0, labeller=None)
    with pytest.raises(EvaluationError, match="eval.tstr.*carry no labels"):
        scorer.report(test_x[:8])


def test_an_unconditional_task_off_the_digits_refuses_tstr_before_training(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(ConfigError, match=r"config key 'eval.tstr': task 'ddpm' draws unlabelled"):
        load_config(None, tiny(tmp_path / "run", "data.name=image_folder",
                               f"data.root={tmp_path / 'photos'}", "eval.tstr=true"))


def test_the_evaluator_reports_tstr_only_when_asked():
    from fedrun.data import build_datasets
    from fedrun.eval.features import build_evaluator

    cfg = load_config(None, ["data.image_size=8", "data.max_samples=300"])
    train, heldout = build_datasets(cfg.data, cfg.seed)
    images = train.get_batch(np.arange(40))
    assert "tstr_accuracy" not in build_evaluator(cfg.eval, train, heldout).report(images)
    asked = load_config(None, ["data.image_size=8", "data.max_samples=300", "eval.tstr=true"])
    record = build_evaluator(asked.eval, train, heldout).report(images)
    assert {"tstr_accuracy", "trtr_accuracy", "tstr_chance"} <= set(record)
    assert record["tstr_samples"] == 40 and 0 <= record["tstr_accuracy"] <= 1
