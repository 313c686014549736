"""One DataLoader worker's work per image: read, decode and augment a generated JPEG (pytest-benchmark),
full-size or reduced-size decode, uint8 out. Sizes from the preset's data suite (`energyvit bench
--suites data` records the same with float32 rows and the collate cost)."""
import pytest
import torch

from _sizes import SIZES
from energyvit.data.files import open_image
from energyvit.data.throughput import write_jpegs
from energyvit.data.transforms import EvalTransform, TrainTransform

DATA = SIZES["data"]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    width, height = DATA.sources[0]
    return write_jpegs(tmp_path_factory.mktemp("jpegs"), DATA.images, width, height)


@pytest.mark.parametrize("draft", [False, True], ids=["full", "draft"])
@pytest.mark.parametrize("transform", [TrainTransform, EvalTransform], ids=["train", "eval"])
def test_decode_and_augment(benchmark, jpegs, transform, draft):
    make = transform(DATA.size, 3, jpeg_draft=draft)
    count = {"i": 0}

    def one_image():
        i = count["i"] = (count["i"] + 1) % len(jpegs)
        with open_image(jpegs[i]) as img:
            return make(img, torch.Generator().manual_seed(i))

    benchmark.extra_info.update(source=DATA.sources[0], size=DATA.size, draft=draft)
    out = benchmark.pedantic(one_image, rounds=len(jpegs) * 3, warmup_rounds=1, iterations=1)
    assert out.shape == (3, DATA.size, DATA.size) and out.dtype == torch.uint8
