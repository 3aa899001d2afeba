"""Paired and unpaired datasets: layout checks (all problems at once), loading, synchronised crops,
reproducible randomness. Images are tiny and generated here."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from transformers import CLIPTokenizer

from training.data import (
    DatasetError,
    PairedDataset,
    UnpairedDataset,
    check_paired_dataset,
    check_unpaired_dataset,
)

CHARS = string.ascii_lowercase + string.digits + ".,'-"


def tokenizer() -> CLIPTokenizer:
    tokens = ["!"] + list(CHARS) + [c + "</w>" for c in CHARS] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=[], pad_token="!", model_max_length=77
    )


def noise(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray | None = None, size=(32, 32), seed: int = 0) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = noise(*size, seed) if array is None else array
    Image.fromarray(array).save(path)
    return array


def make_paired(root: Path, names=("a.png", "b.png"), prompts: dict | None = None, size=(32, 32)) -> Path:
    for i, name in enumerate(names):
        arr = save(root / "train_A" / name, size=size, seed=i)
        save(root / "train_B" / name, arr)
    prompts = prompts if prompts is not None else {n: f"photo {n[0]}" for n in names}
    (root / "train_prompts.json").write_text(json.dumps(prompts))
    return root


def problems_of(fn, *args, **kwargs) -> tuple[str, list[str]]:
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    return str(info.value), info.value.problems


# --- paired checks ----------------------------------------------------------------------------------


def test_paired_reports_every_problem_together(tmp_path):
    root = make_paired(tmp_path, names=("a.png", "b.png", "c.png"))
    save(root / "train_A" / "only_a.png")
    save(root / "train_B" / "only_b.jpg")
    for side in "AB":
        (root / f"train_{side}" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "train_A" / "notes.txt").write_text("ignored")
    prompts = {"a.png": "x", "b.png": "y", "only_a.png": "z", "ghost.png": "w", "notes.txt": "v"}
    (root / "train_prompts.json").write_text(json.dumps(prompts))
    message, problems = problems_of(check_paired_dataset, root, "train")
    expected = [
        "images in train_A without a partner in train_B (1):\n    - only_a.png",
        "images in train_B without a partner in train_A (1):\n    - only_b.jpg",
        "images in train_A without a prompt (2):\n    - broken.png\n    - c.png",
        "prompts whose image is missing (2):\n    - ghost.png (not in train_A)\n    - notes.txt (unsupported",
        "unreadable images (2):",
        "train_A/broken.png",
        "train_B/broken.png",
    ]
    for text in expected:
        assert text in message, text
    assert len(problems) == 1 + 1 + 2 + 2 + 2
    assert message.startswith(f"paired dataset {root}, split 'train': 8 problem(s)")


def test_paired_missing_folders_and_prompt_file(tmp_path):
    message, problems = problems_of(check_paired_dataset, tmp_path, "test")
    assert f"{tmp_path / 'test_A'}" in message and f"{tmp_path / 'test_B'}" in message
    assert (
        f"missing prompt file (1):\n    - {tmp_path / 'test_prompts.json'} (or test_prompts.jsonl)" in message
    )
    assert len(problems) == 3


def test_paired_invalid_json_has_line_number(tmp_path):
    root = make_paired(tmp_path)
    (root / "train_prompts.json").write_text('{"a.png": "x",\n "b.png": }\n')
    message, _ = problems_of(check_paired_dataset, root)
    assert "train_prompts.json: invalid JSON at line 2, column 11" in message
    (root / "train_prompts.json").write_text('["a.png"]')
    assert "expected one JSON object" in problems_of(check_paired_dataset, root)[0]


def test_paired_jsonl_errors_each_with_its_line(tmp_path):
    root = make_paired(tmp_path)
    (root / "train_prompts.json").unlink()
    lines = [
        '{"file_name": "a.png", "prompt": "x"}',
        '{"file_name": "b.png", "prompt": ',
        '{"image": "b.png"}',
        "",
        '{"name": "a.png", "text": "again"}',
    ]
    (root / "train_prompts.jsonl").write_text("\n".join(lines))
    message, problems = problems_of(check_paired_dataset, root)
    assert "train_prompts.jsonl line 2: invalid JSON" in message
    assert "line 3: no prompt key (one of prompt, text, caption)" in message
    assert "line 5: 'a.png' already has a prompt (line 1)" in message
    assert "images in train_A without a prompt (1):\n    - b.png" in message
    assert len(problems) == 4


def test_paired_empty_split_and_both_prompt_files(tmp_path):
    (tmp_path / "train_A").mkdir()
    (tmp_path / "train_B").mkdir()
    (tmp_path / "train_prompts.json").write_text("{}")
    assert "empty split (1)" in problems_of(check_paired_dataset, tmp_path)[0]
    (tmp_path / "train_prompts.jsonl").write_text("")
    assert "keep one" in problems_of(check_paired_dataset, tmp_path)[0]


def test_paired_no_resize_size_mismatch(tmp_path):
    root = make_paired(tmp_path, names=("a.png",))
    save(root / "train_B" / "a.png", size=(40, 32))
    check_paired_dataset(root)  # sizes only matter when the preparation keeps them
    message, _ = problems_of(check_paired_dataset, root, image_prep="no_resize")
    assert "a.png: 32x32 vs 40x32" in message


# --- paired items -----------------------------------------------------------------------------------


def test_paired_item_values_and_tokens(tmp_path):
    root = make_paired(tmp_path, names=("b.png", "a.png"), prompts={"b.png": "a bee", "a.png": "an ant"})
    ds = PairedDataset(root, "train", "no_resize", tokenizer=tokenizer())
    assert ds.names == ["b.png", "a.png"]  # the prompt file's order, as the original
    item = ds[1]
    source = TF.to_tensor(Image.open(root / "train_A" / "a.png"))
    assert torch.equal(item["conditioning_pixel_values"], source)
    assert torch.allclose(item["output_pixel_values"], source * 2 - 1, atol=1e-6)
    assert item["caption"] == "an ant"
    assert item["input_ids"].shape == (77,)
    assert item["input_ids"][0].item() == ds.tokenizer.bos_token_id


def test_paired_random_crops_are_synchronised_and_reproducible(tmp_path):
    root = make_paired(tmp_path, names=("a.png", "b.png"), size=(48, 40))
    prep = "resize_286_randomcrop_256x256_hflip"
    seeded = PairedDataset(root, "train", prep, seed=7)
    unseeded = PairedDataset(root, "train", prep)
    crops = []
    for epoch in range(4):
        seeded.set_epoch(epoch)
        for ds in (seeded, unseeded):
            item = ds[0]
            cond, out = item["conditioning_pixel_values"], item["output_pixel_values"]
            assert cond.shape == (3, 256, 256)
            # input == target image, so a synchronised crop/flip gives the same pixels on both sides
            assert torch.allclose(cond * 2 - 1, out, atol=1e-6)
        crops.append(seeded[0]["output_pixel_values"])
    assert any(not torch.equal(crops[0], c) for c in crops[1:])  # the crop really is random
    seeded.set_epoch(2)
    again = PairedDataset(root, "train", prep, seed=7)
    again.set_epoch(2)
    assert torch.equal(again[0]["output_pixel_values"], crops[2])
    state = torch.get_rng_state()
    seeded[1]
    assert torch.equal(state, torch.get_rng_state())  # a seeded dataset leaves the global RNG alone


def test_paired_crops_to_multiple_of_8(tmp_path):
    root = make_paired(tmp_path, names=("a.png",), size=(60, 45))
    item = PairedDataset(root, "train", "no_resize")[0]
    assert item["conditioning_pixel_values"].shape == (3, 40, 56)
    full = TF.to_tensor(Image.open(root / "train_A" / "a.png"))
    assert torch.equal(item["conditioning_pixel_values"], full[:, 2:42, 2:58])


def test_paired_odd_image_modes_load_as_rgb(tmp_path):
    names = ("gray.png", "palette.png", "rgba.png", "deep.png")
    root = make_paired(tmp_path, names=names)
    folder = root / "train_A"
    rgb = noise(32, 32, 3)
    Image.fromarray(rgb).convert("L").save(folder / "gray.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 255, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(np.full((32, 32), 257 * 100, np.uint16)).save(folder / "deep.png")
    assert Image.open(folder / "deep.png").mode.startswith("I")
    check_paired_dataset(root)
    ds = PairedDataset(root, "train", "no_resize")
    items = {name: ds[i]["conditioning_pixel_values"] for i, name in enumerate(ds.names)}
    assert all(t.shape == (3, 32, 32) for t in items.values())
    assert torch.allclose(items["deep.png"], torch.full((3, 32, 32), 100 / 255))
    assert torch.equal(items["rgba.png"], TF.to_tensor(Image.fromarray(rgb)))
    gray = items["gray.png"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_paired_jsonl_prompts(tmp_path):
    root = make_paired(tmp_path, names=("a.png", "b.png"))
    (root / "train_prompts.json").unlink()
    lines = [{"image": "train_A/a.png", "caption": "first"}, {"file_name": "b.png", "text": "second"}]
    (root / "train_prompts.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = PairedDataset(root, "train", "no_resize")
    assert [ds[i]["caption"] for i in range(len(ds))] == ["first", "second"]


# --- unpaired ---------------------------------------------------------------------------------------


def make_unpaired(root: Path) -> Path:
    save(root / "train_A" / "x.JPG", size=(32, 24), seed=1)
    save(root / "train_A" / "y.webp", size=(32, 24), seed=2)
    save(root / "train_A" / "z.png", size=(32, 24), seed=3)
    (root / "train_A" / "readme.md").write_text("ignored")
    save(root / "train_B" / "p.png", size=(40, 40), seed=4)
    save(root / "train_B" / "q.bmp", size=(40, 40), seed=5)
    (root / "fixed_prompt_a.txt").write_text("picture of a day\n")
    (root / "fixed_prompt_b.txt").write_text("picture of a night")
    return root


def test_unpaired_reports_every_problem_together(tmp_path):
    root = make_unpaired(tmp_path)
    (root / "fixed_prompt_a.txt").write_text("  \n")
    (root / "fixed_prompt_b.txt").unlink()
    (root / "train_A" / "bad.jpeg").write_bytes(b"garbage")
    message, problems = problems_of(check_unpaired_dataset, root, "train")
    assert f"missing caption files (1):\n    - {root / 'fixed_prompt_b.txt'}" in message
    assert f"empty caption files (1):\n    - {root / 'fixed_prompt_a.txt'}" in message
    assert "unreadable images (1):" in message and "bad.jpeg" in message
    assert len(problems) == 3
    message, problems = problems_of(check_unpaired_dataset, root, "test")
    assert f"missing folders (2):\n    - {root / 'test_A'}\n    - {root / 'test_B'}" in message
    (root / "test_A").mkdir()
    (root / "test_B").mkdir()
    message, _ = problems_of(check_unpaired_dataset, root, "test")
    assert f"empty split (2):\n    - no images in {root / 'test_A'}" in message


def test_unpaired_items_and_reproducible_randomness(tmp_path):
    root = make_unpaired(tmp_path)
    ds = UnpairedDataset(root, "train", "no_resize", tokenizer=tokenizer(), seed=3)
    assert ds.names_src == ["x.JPG", "y.webp", "z.png"] and len(ds) == 5
    assert ds.caption_src == "picture of a day" and ds.caption_tgt == "picture of a night"
    item = ds[1]
    expected = TF.normalize(
        TF.to_tensor(Image.open(root / "train_A" / "y.webp").convert("RGB")), [0.5], [0.5]
    )
    assert torch.equal(item["pixel_values_src"], expected)
    assert item["pixel_values_tgt"].shape == (3, 40, 40)
    assert item["input_ids_src"].shape == (77,) and not torch.equal(
        item["input_ids_src"], item["input_ids_tgt"]
    )

    def picks(dataset, epoch):
        dataset.set_epoch(epoch)
        items = [dataset[i] for i in range(len(dataset))]
        return [
            torch.cat([it["pixel_values_src"].flatten(), it["pixel_values_tgt"].flatten()]) for it in items
        ]

    first = picks(ds, 0)
    same = picks(UnpairedDataset(root, "train", "no_resize", seed=3), 0)
    assert all(torch.equal(a, b) for a, b in zip(first, same, strict=True))
    later = [picks(ds, epoch) for epoch in (1, 2, 3)]
    assert any(not torch.equal(a, b) for run in later for a, b in zip(first, run, strict=True))


# --- what would fail only in the middle of training -------------------------------------------------


def truncated_jpeg(path: Path, seed: int = 0) -> None:
    save(path.with_suffix(".tmp.png"), size=(64, 64), seed=seed)
    Image.open(path.with_suffix(".tmp.png")).save(path, format="JPEG", quality=90)
    path.with_suffix(".tmp.png").unlink()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_jpeg_is_found_up_front(tmp_path):
    root = make_paired(tmp_path / "paired", names=("a.png", "b.jpg"))
    truncated_jpeg(root / "train_B" / "b.jpg")
    with Image.open(root / "train_B" / "b.jpg") as image:
        image.verify()  # what the check used to rely on: it passes
    message, problems = problems_of(check_paired_dataset, root)
    assert len(problems) == 1 and "unreadable images (1)" in message
    assert f"{root / 'train_B' / 'b.jpg'}: OSError: image file is truncated" in message
    root = make_unpaired(tmp_path / "unpaired")
    truncated_jpeg(root / "train_A" / "x.JPG")
    message, problems = problems_of(check_unpaired_dataset, root)
    assert len(problems) == 1 and f"{root / 'train_A' / 'x.JPG'}: OSError" in message


def test_no_resize_batches_need_one_size(tmp_path):
    root = make_paired(tmp_path / "paired", names=("a.png", "b.png", "c.png"))
    for side in "AB":
        save(root / f"train_{side}" / "c.png", size=(50, 40))  # 48x40 after the crop to multiples of 8
    check_paired_dataset(root, image_prep="no_resize", batch_size=1)  # one image per batch: fine
    message, problems = problems_of(check_paired_dataset, root, image_prep="no_resize", batch_size=2)
    assert "a batch of 2 needs one" in message and len(problems) == 2
    assert f"32x32: 2 image(s), e.g. {root / 'train_A' / 'a.png'}" in message
    assert f"48x40: 1 image(s), e.g. {root / 'train_A' / 'c.png'}" in message
    with pytest.raises(DatasetError, match="48x40"):
        PairedDataset(root, "train", "no_resize", batch_size=2)
    PairedDataset(root, "train", "resize_256", batch_size=2)  # a resizing preparation: one size anyway
    # unpaired: each domain needs one size (A and B may differ)
    root = make_unpaired(tmp_path / "unpaired")
    check_unpaired_dataset(root, image_prep="no_resize", batch_size=2)  # A 32x24, B 40x40
    save(root / "train_A" / "w.png", size=(40, 24))
    message, problems = problems_of(check_unpaired_dataset, root, image_prep="no_resize", batch_size=2)
    assert f"images of different sizes in {root / 'train_A'}" in message and len(problems) == 2
    assert f"40x24: 1 image(s), e.g. {root / 'train_A' / 'w.png'}" in message


def test_unpaired_images_under_8_px_are_named_up_front(tmp_path):
    root = make_unpaired(tmp_path)
    save(root / "train_B" / "thin.png", size=(6, 20))
    check_unpaired_dataset(root, image_prep="resize_256")  # resized: fine
    message, _ = problems_of(check_unpaired_dataset, root, image_prep="no_resize")
    thin = root / "train_B" / "thin.png"
    assert f"images smaller than 8 px (no_resize) (1):\n    - {thin}: 6x20" in message
    # unchecked, the item that meets it says which file it is
    ds = UnpairedDataset(root, "train", "no_resize", seed=0, check=False)
    ds.names_src, ds.names_tgt = ds.names_src[:1], ["thin.png"]
    with pytest.raises(DatasetError, match=f"{root / 'train_B' / 'thin.png'}: image is too small"):
        ds[0]


def test_a_test_image_that_breaks_later_is_called_a_test_image(tmp_path):
    root = make_paired(tmp_path, names=("a.png",))
    for side in "AB":
        (root / f"train_{side}").rename(root / f"test_{side}")
    (root / "train_prompts.json").rename(root / "test_prompts.json")
    ds = PairedDataset(root, "test", "no_resize")
    (root / "test_B" / "a.png").write_bytes(b"broken since the check")
    with pytest.raises(DatasetError, match="cannot load test image") as info:
        ds[0]
    assert str(root / "test_B" / "a.png") in str(info.value) and "training" not in str(info.value)


def test_no_resize_sizes_are_those_after_the_exif_rotation(tmp_path):
    root = make_paired(tmp_path, names=("a.jpg",), size=(48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 32x48, shown (and loaded) turned by 90 degrees: 48x32
    Image.fromarray(noise(32, 48, 1)).save(root / "train_A" / "a.jpg", exif=exif)
    assert PairedDataset(root, "train", "no_resize")[0]["conditioning_pixel_values"].shape == (3, 32, 48)
    check_paired_dataset(root, image_prep="no_resize")  # same size as its 48x32 partner once loaded


def test_check_all_lists_every_problem_of_every_split(tmp_path):
    from training.data import DatasetError, check_all, check_paired_dataset

    def fails(n):
        def check():
            raise DatasetError(f"split {n}", [f"problem {n}.1", f"problem {n}.2"])

        return check

    with pytest.raises(DatasetError) as e:
        check_all(fails(1), lambda: "fine", fails(2))
    assert str(e.value) == "split 1\nsplit 2"
    assert e.value.problems == ["problem 1.1", "problem 1.2", "problem 2.1", "problem 2.2"]
    assert check_all(lambda: 1, lambda: None) == [1, None]
    with pytest.raises(DatasetError) as e:
        check_all(
            lambda: check_paired_dataset(tmp_path, "train"), lambda: check_paired_dataset(tmp_path, "test")
        )
    assert "split 'train'" in str(e.value) and "split 'test'" in str(e.value)
