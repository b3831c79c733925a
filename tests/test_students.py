"""Tests of the L2BT students detector (tiny random ViT teacher, small images)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hrad.detectors import build_detector, detector_config
from hrad.detectors.scoring import top_fraction_score
from hrad.detectors.students import (
    Students,
    StudentsConfig,
    TokenReservoir,
    default_student_blocks,
    normalised_distance,
)
from hrad.errors import ArtifactError, ConfigError, InputError, NotFittedError
from hrad.features import BackboneConfig, Embedder, build_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test embeddings of smooth random images through the tiny ViT (block3 + block4)."""
    extractor = build_backbone(BackboneConfig(name="tiny-vit"))
    embedder = Embedder(extractor, Students.default_embedding(extractor))
    generator = torch.Generator().manual_seed(1)
    low = torch.rand(10, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(low, size=(112, 112), mode="bilinear", align_corners=False)
    images = (images + 0.05 * torch.rand(images.shape, generator=generator)).clamp(0, 1)
    embeddings = embedder(images)
    return embeddings[:8], embeddings[8:]


def _fit(train: torch.Tensor, **options: object) -> Students:
    config = StudentsConfig.model_validate({"epochs": 30, "batch_tokens": 64, "learning_rate": 3e-3, **options})
    detector = Students(config)
    detector.fit([train[:4], train[4:]])
    return detector


def test_default_blocks_follow_the_paper_and_scale_with_depth() -> None:
    assert default_student_blocks(12) == ("block8", "block12")
    assert default_student_blocks(4) == ("block3", "block4")
    assert default_student_blocks(24) == ("block16", "block24")
    with pytest.raises(ConfigError):
        default_student_blocks(1)
    vit = build_backbone(BackboneConfig(name="tiny-vit"))
    assert Students.default_embedding(vit).layers == ("block3", "block4")
    assert Students.default_embedding(vit).aggregation == 1


def test_cnn_backbone_and_wrong_layer_count_are_config_errors() -> None:
    cnn = build_backbone(BackboneConfig(name="tiny-cnn"))
    with pytest.raises(ConfigError, match="ViT teacher"):
        Students.embedding_spec(StudentsConfig(), cnn)
    vit = build_backbone(BackboneConfig(name="tiny-vit"))
    with pytest.raises(ConfigError, match="exactly two layers"):
        Students.embedding_spec(StudentsConfig(layers=("block2", "block3", "block4")), vit)
    assert Students.embedding_spec(StudentsConfig(layers=("block1", "block4")), vit).layers == ("block1", "block4")


def test_registered_under_students() -> None:
    config = detector_config({"name": "students", "epochs": 3})
    assert isinstance(config, StudentsConfig) and config.learning_rate == 1e-3 and config.fusion == "product"
    assert isinstance(build_detector(config), Students)


def test_training_reduces_the_loss(vit_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, _ = vit_embeddings
    detector = _fit(train)
    assert len(detector.loss_history) == 30
    assert detector.loss_history[-1] < 0.5 * detector.loss_history[0]


def test_corrupted_tokens_score_higher_at_their_positions(vit_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, test = vit_embeddings
    detector = _fit(train, epochs=60)
    corrupted = test.clone()
    positions = [(1, 2), (5, 6), (7, 0)]
    generator = torch.Generator().manual_seed(5)
    channels = corrupted.shape[1]
    for y, x in positions:
        # block k token replaced by one from elsewhere + noise: block j and block k disagree here
        corrupted[0, channels // 2 :, y, x] = test[1, channels // 2 :, 7 - y, 7 - x] + torch.randn(
            channels // 2, generator=generator
        )
    clean_output = detector.predict(test[:1])
    output = detector.predict(corrupted[:1])
    assert output.maps.shape == (1, 8, 8)
    marked = torch.zeros(8, 8, dtype=torch.bool)
    for y, x in positions:
        marked[y, x] = True
    assert output.maps[0][marked].min() > output.maps[0][~marked].max()
    assert float(output.scores[0]) > float(clean_output.scores[0])
    # untouched tokens keep their clean values: the students look at one token at a time
    torch.testing.assert_close(output.maps[0][~marked], clean_output.maps[0][~marked])


def test_fusion_product_sum_and_single_directions(vit_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, test = vit_embeddings
    detector = _fit(train, epochs=2)
    backward_map, forward_map = detector.direction_maps(test)
    expected = {
        "product": backward_map * forward_map,
        "sum": backward_map + forward_map,
        "forward": forward_map,
        "backward": backward_map,
    }
    for fusion, maps in expected.items():
        detector.config = detector.config.model_copy(update={"fusion": fusion})
        torch.testing.assert_close(detector.predict(test).maps, maps)
    # the distances are between unit vectors: each direction lies in [0, 2]
    assert float(backward_map.min()) >= 0 and float(forward_map.max()) <= 2


def test_normalised_distance_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    prediction, target = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    expected = np.linalg.norm(unit(prediction) - unit(target), axis=1)
    got = normalised_distance(torch.from_numpy(prediction), torch.from_numpy(target)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)


@pytest.mark.parametrize(("fraction", "size"), [(0.001, (5, 7)), (0.1, (9, 9)), (0.5, (4, 6)), (1.0, (3, 3))])
def test_top_fraction_score_matches_numpy(fraction: float, size: tuple[int, int]) -> None:
    maps = np.random.default_rng(3).random((3, *size))
    count = max(1, math.ceil(fraction * size[0] * size[1]))
    expected = [np.sort(m.ravel())[::-1][:count].mean() for m in maps]
    got = top_fraction_score(torch.from_numpy(maps), fraction).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_state_round_trip_is_identical(vit_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, test = vit_embeddings
    detector = _fit(train, epochs=3)
    state = detector.state_dict()
    assert state["layer_channels"].tolist() == [16, 16]
    restored = Students(StudentsConfig())
    restored.load_state_dict({key: value.clone() for key, value in state.items()})
    first, second = detector.predict(test), restored.predict(test)
    assert torch.equal(first.maps, second.maps) and torch.equal(first.scores, second.scores)
    with pytest.raises(ArtifactError):
        Students(StudentsConfig()).load_state_dict({k: v for k, v in state.items() if k != "network.forward_student.4.weight"})
    with pytest.raises(ArtifactError):
        Students(StudentsConfig()).load_state_dict({k: v for k, v in state.items() if k != "layer_channels"})


def test_same_seed_same_students_other_seed_differs(vit_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, _ = vit_embeddings
    a, b = _fit(train, epochs=2, max_tokens=300), _fit(train, epochs=2, max_tokens=300)
    c = _fit(train, epochs=2, max_tokens=300, seed=1)
    state_a, state_b, state_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
    assert not torch.equal(state_a["network.forward_student.0.weight"], state_c["network.forward_student.0.weight"])


def test_reservoir_keeps_the_smallest_keys_of_the_whole_stream() -> None:
    tokens = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 2)
    chunks = [tokens[:130], tokens[130:140], tokens[140:600], tokens[600:]]
    reservoir = TokenReservoir(200, torch.float32, torch.Generator().manual_seed(7))
    for chunk in chunks:
        reservoir.add(chunk, chunk[:, 0].to(torch.int32))
    keys_generator = torch.Generator().manual_seed(7)
    keys = torch.cat([torch.rand(len(chunk), generator=keys_generator) for chunk in chunks])
    expected = set(keys.topk(200, largest=False).indices.tolist())
    assert reservoir.tokens is not None and reservoir.image_ids is not None
    assert set(reservoir.tokens[:, 0].long().tolist()) == expected
    assert torch.equal(reservoir.image_ids.long(), reservoir.tokens[:, 0].long())
    assert reservoir.tokens_seen == 1000


def test_max_tokens_and_tokens_per_epoch_bound_the_work(vit_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, test = vit_embeddings
    detector = _fit(train, epochs=2, max_tokens=100, tokens_per_epoch=64, buffer_dtype="float32")
    assert detector.predict(test).maps.shape == (2, 8, 8)
    assert detector.last_predict_seconds > 0


def test_held_out_images_early_stopping(vit_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, _ = vit_embeddings
    detector = _fit(train, epochs=200, val_fraction=0.25, patience=2, learning_rate=0.05)
    assert len(detector.val_history) == len(detector.loss_history) <= 200
    with pytest.raises(InputError, match="at least 2 training images"):
        Students(StudentsConfig(epochs=1, val_fraction=0.5)).fit([train[:1]])


def test_user_mistakes_raise_hrad_errors(vit_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
    train, test = vit_embeddings
    with pytest.raises(NotFittedError, match="not been fitted"):
        Students(StudentsConfig()).predict(test)
    with pytest.raises(InputError, match="no training embeddings"):
        Students(StudentsConfig()).fit([])
    with pytest.raises(InputError, match="split_at"):
        Students(StudentsConfig(epochs=1)).fit([train[:, :31]])
    detector = _fit(train, epochs=1)
    with pytest.raises(InputError, match="32-channel"):
        detector.predict(test[:, :30])


class _Recording(Students):
    """Students that keep every training batch (tokens as rows)."""

    def __init__(self, config: StudentsConfig) -> None:
        super().__init__(config)
        self.batches: list[torch.Tensor] = []

    def training_step(self, embeddings: torch.Tensor) -> torch.Tensor:
        self.batches.append(embeddings.flatten(1).clone())
        return super().training_step(embeddings)


@pytest.mark.parametrize("per_step", [1, 3])
def test_batch_images_steps_on_whole_images_reshuffled_every_epoch(
    vit_embeddings: tuple[torch.Tensor, torch.Tensor], per_step: int
) -> None:
    """The paper's Algorithm 1 (1 image per step) and the reference code's batching (4): each step
    holds every token of ``per_step`` whole images, every image once per epoch, a new order each epoch."""
    train, _ = vit_embeddings  # 8 images of 8 x 8 tokens
    detector = _Recording(StudentsConfig(epochs=2, batch_images=per_step, learning_rate=3e-3))
    detector.fit([train[:4], train[4:]])
    owner = {}
    for image in range(len(train)):
        for row in train[image].permute(1, 2, 0).reshape(64, -1).half().float():
            owner[row.numpy().tobytes()] = image
    steps = math.ceil(len(train) / per_step)
    assert len(detector.batches) == 2 * steps
    orders = []
    for epoch in range(2):
        seen: list[int] = []
        for batch in detector.batches[epoch * steps : (epoch + 1) * steps]:
            images = [owner[row.numpy().tobytes()] for row in batch]
            distinct = sorted(set(images))
            assert len(batch) == 64 * len(distinct) and all(images.count(i) == 64 for i in distinct)
            assert len(distinct) == min(per_step, len(train) - len(seen))
            seen.extend(dict.fromkeys(images))
        assert sorted(seen) == list(range(len(train)))
        orders.append(tuple(seen))
    assert orders[0] != orders[1]
    assert detector.loss_history[-1] < detector.loss_history[0]


def test_batch_images_excludes_tokens_per_epoch() -> None:
    with pytest.raises(ValueError, match="tokens_per_epoch"):
        StudentsConfig(batch_images=4, tokens_per_epoch=100)


@pytest.mark.gpu
def test_on_cuda_predict_queues_the_students_without_waiting(vit_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
    """predict times the students with CUDA events read on demand: nothing in it synchronises
    (torch's sync debug mode raises on any wait), in float32 and under bfloat16 autocast; the
    time is there when asked."""
    train, test = vit_embeddings
    for precision in ("float32", "bfloat16"):
        detector = _fit(train.cuda(), epochs=2, precision=precision)
        queries = test.cuda()  # a copy to the device waits: before the check
        detector.predict(queries)  # warm-up
        torch.cuda.set_sync_debug_mode("error")
        try:
            output = detector.predict(queries)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert output.maps.is_cuda and output.maps.dtype == torch.float32
        assert detector.last_predict_seconds > 0
