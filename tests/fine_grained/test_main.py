"""fine_grained/: every on-disk format parsed from synthetic roots, the metrics against hand-computed
values, the layout error, and end-to-end runs (colour classes, VOC multi-label, feature cache)."""
import io
import json
import os
import pickle
import shutil
import struct

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import models  # noqa: E402
from common.probe import backbone_identity  # noqa: E402
from fine_grained import main as fg_main  # noqa: E402
from fine_grained.cache import backbone_fingerprint  # noqa: E402
from fine_grained.datasets import DATASETS, VOC_CLASSES, DatasetLayoutError, holdout_split  # noqa: E402
from fine_grained.metrics import mean_per_class_accuracy, top1_accuracy, voc11_average_precision, voc_mean_ap  # noqa: E402

TINY = {"depth": 2, "embed_dim": 48, "num_heads": 2}
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 40, 220), (230, 220, 40)]


pytestmark = pytest.mark.usefixtures("one_thread")


def colour_image(path, rgb, rng, size=32):
    """A noisy image of one colour (the only thing that tells classes apart)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def write_lines(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------

def test_mean_per_class_accuracy_by_hand():
    # class 0: 3 samples, 2 right; class 1: 1 sample, right; class 2: 2 samples, 0 right
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    preds = torch.tensor([0, 0, 1, 1, 0, 1])
    scores = torch.nn.functional.one_hot(preds, 3).float()
    assert mean_per_class_accuracy(scores, targets) == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    assert top1_accuracy(scores, targets) == pytest.approx(100 * 3 / 6)


def test_voc_11_point_ap_by_hand():
    # ranking: +, -, +, -, -  (2 positives). Points (recall, precision): (0.5, 1), (0.5, .5), (1, 2/3), (1, .5), (1, .4)
    # plus the (0, 1) end point. Max precision with recall >= t: t in {0..0.5} -> 1 (6 thresholds), t in {0.6..1} -> 2/3
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    positives = torch.tensor([1, 0, 1, 0, 0])
    assert voc11_average_precision(scores, positives) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # a negative ranked first: the (recall 0, precision 1) end point still gives 1 at t = 0 (sklearn's curve)
    scores2 = torch.tensor([0.9, 0.8, 0.7])
    positives2 = torch.tensor([0, 1, 0])
    assert voc11_average_precision(scores2, positives2) == pytest.approx((1 + 10 * 0.5) / 11)
    # tied scores form one threshold: both at 0.5 -> single point (recall 1, precision 0.5)
    assert voc11_average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx((1 + 10 * .5) / 11)


def test_voc_ap_matches_sklearn_curve():
    from sklearn.metrics import precision_recall_curve

    g = torch.Generator().manual_seed(0)
    scores, positives = torch.randn(200, 3, generator=g), (torch.rand(200, 3, generator=g) > 0.7).long()
    expected = []
    for k in range(3):
        p, r, _ = precision_recall_curve(positives[:, k].numpy(), scores[:, k].numpy())
        expected.append(np.mean([p[r >= t].max() if (r >= t).any() else 0 for t in np.linspace(0, 1, 11)]))
    assert voc_mean_ap(scores, positives) == pytest.approx(100 * np.mean(expected), abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# on-disk formats
# ---------------------------------------------------------------------------------------------------

def make_aircraft(root, rng):
    base = os.path.join(root, "fgvc-aircraft-2013b", "data")
    write_lines(os.path.join(base, "variants.txt"), ["707-320", "A320", "Cessna 172"])
    for split, ids in (("train", ["001", "002", "003"]), ("val", ["004"]), ("test", ["005", "006"])):
        variants = ["707-320", "A320", "Cessna 172"]
        write_lines(os.path.join(base, f"images_variant_{split}.txt"), [f"{i} {variants[int(i) % 3]}" for i in ids])
        for i in ids:
            colour_image(os.path.join(base, "images", f"{i}.jpg"), COLOURS[0], rng, 8)
    return {"classes": 3, "train": 3, "val": 1, "test": 2, "first_train_label": 1}  # '001' -> variants[1]


def make_caltech101(root, rng):
    for cls in ("accordion", "BACKGROUND_Google"):
        colour_image(os.path.join(root, "101_ObjectCategories", cls, "image_0001.jpg"), COLOURS[1], rng, 8)
    write_lines(os.path.join(root, "train.txt"), ["BACKGROUND_Google/image_0001.jpg 0", "accordion/image_0001.jpg 1"])
    write_lines(os.path.join(root, "test.txt"), ["accordion/image_0001.jpg 1"])
    return {"classes": 2, "train": 2, "val": None, "test": 1, "first_train_label": 0}


def make_cars(root, rng):
    from scipy.io import savemat

    base = os.path.join(root, "stanford_cars")
    os.makedirs(os.path.join(base, "devkit"))
    names = np.array(["AM General", "Acura"], dtype=object)
    savemat(os.path.join(base, "devkit", "cars_meta.mat"), {"class_names": names})
    def annos(names, classes):
        rec = np.zeros(len(names), dtype=[("fname", object), ("class", np.int32)])
        rec["fname"], rec["class"] = names, classes
        return {"annotations": rec}
    savemat(os.path.join(base, "devkit", "cars_train_annos.mat"), annos(["00001.jpg", "00002.jpg"], [2, 1]))
    savemat(os.path.join(base, "cars_test_annos_withlabels.mat"), annos(["00001.jpg"], [1]))
    for folder, n in (("cars_train", 2), ("cars_test", 1)):
        for i in range(1, n + 1):
            colour_image(os.path.join(base, folder, f"{i:05d}.jpg"), COLOURS[2], rng, 8)
    return {"classes": 2, "train": 2, "val": None, "test": 1, "first_train_label": 1}


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` opcodes, as in the official CIFAR files (Python 2 cPickle, protocol 2)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_pickle(path, obj):
    """`obj` pickled as Python 2 wrote it: bytes as `str`, numpy under its 1.x module name."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def _cifar_batch(path, n, label_key, rng, num_classes):
    _py2_pickle(path, {b"batch_label": b"training batch 1 of 5",
                       label_key.encode(): [i % num_classes for i in range(n)],
                       b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                       b"filenames": [f"img_{i}.png".encode() for i in range(n)]})


def make_cifar10(root, rng):
    base = os.path.join(root, "cifar-10-batches-py")
    for i in range(1, 6):
        _cifar_batch(os.path.join(base, f"data_batch_{i}"), 2, "labels", rng, 10)
    _cifar_batch(os.path.join(base, "test_batch"), 3, "labels", rng, 10)
    _py2_pickle(os.path.join(base, "batches.meta"), {b"label_names": [f"c{i}".encode() for i in range(10)],
                                                     b"num_cases_per_batch": 10000, b"num_vis": 3072})
    return {"classes": 10, "train": 10, "val": None, "test": 3, "first_train_label": 0}


def make_cifar100(root, rng):
    base = os.path.join(root, "cifar-100-python")
    _cifar_batch(os.path.join(base, "train"), 4, "fine_labels", rng, 100)
    _cifar_batch(os.path.join(base, "test"), 2, "fine_labels", rng, 100)
    _py2_pickle(os.path.join(base, "meta"), {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                             b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    return {"classes": 100, "train": 4, "val": None, "test": 2, "first_train_label": 0}


def make_dtd(root, rng):
    base = os.path.join(root, "dtd", "dtd")
    for split, names in (("train", ["banded/b1.jpg", "zigzagged/z1.jpg"]), ("val", ["banded/b2.jpg"]),
                         ("test", ["zigzagged/z2.jpg"])):
        write_lines(os.path.join(base, "labels", f"{split}1.txt"), names)
        for n in names:
            colour_image(os.path.join(base, "images", n), COLOURS[3], rng, 8)
    return {"classes": 2, "train": 2, "val": 1, "test": 1, "first_train_label": 0}


def make_flowers(root, rng):
    from scipy.io import savemat

    base = os.path.join(root, "flowers-102")
    os.makedirs(base)
    savemat(os.path.join(base, "imagelabels.mat"), {"labels": np.array([1, 2, 2, 1, 2])})
    savemat(os.path.join(base, "setid.mat"), {"trnid": np.array([1, 2]), "valid": np.array([3]),
                                              "tstid": np.array([4, 5])})
    for i in range(1, 6):
        colour_image(os.path.join(base, "jpg", f"image_{i:05d}.jpg"), COLOURS[0], rng, 8)
    return {"classes": 2, "train": 2, "val": 1, "test": 2, "first_train_label": 0}


def make_food(root, rng):
    base = os.path.join(root, "food-101")
    meta = {"train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "sushi": ["sushi/3"]},
            "test": {"sushi": ["sushi/4"]}}
    for split, content in meta.items():
        os.makedirs(os.path.join(base, "meta"), exist_ok=True)
        with open(os.path.join(base, "meta", f"{split}.json"), "w") as f:
            json.dump(content, f)
        for paths in content.values():
            for p in paths:
                colour_image(os.path.join(base, "images", f"{p}.jpg"), COLOURS[1], rng, 8)
    return {"classes": 2, "train": 3, "val": None, "test": 1, "first_train_label": 0}


def make_pets(root, rng):
    base = os.path.join(root, "oxford-iiit-pet")
    write_lines(os.path.join(base, "annotations", "trainval.txt"), ["Abyssinian_1 1 1 1", "beagle_2 2 2 1"])
    write_lines(os.path.join(base, "annotations", "test.txt"), ["beagle_3 2 2 1"])
    for i in ("Abyssinian_1", "beagle_2", "beagle_3"):
        colour_image(os.path.join(base, "images", f"{i}.jpg"), COLOURS[2], rng, 8)
    return {"classes": 2, "train": 2, "val": None, "test": 1, "first_train_label": 0}


def make_sun397(root, rng):
    write_lines(os.path.join(root, "ClassName.txt"), ["/b/bakery/shop", "/a/abbey"])
    write_lines(os.path.join(root, "Training_01.txt"), ["/b/bakery/shop/sun_1.jpg", "/a/abbey/sun_2.jpg"])
    write_lines(os.path.join(root, "Testing_01.txt"), ["/a/abbey/sun_3.jpg"])
    for p in ("b/bakery/shop/sun_1.jpg", "a/abbey/sun_2.jpg", "a/abbey/sun_3.jpg"):
        colour_image(os.path.join(root, p), COLOURS[3], rng, 8)
    return {"classes": 2, "train": 2, "val": None, "test": 1, "first_train_label": 1}  # sorted: abbey, bakery/shop


def make_voc2007(root, rng, n_per_split=None, image_size=8):
    """Images coloured by their first positive class, so the labels are learnable."""
    base = os.path.join(root, "VOCdevkit", "VOC2007")
    n_per_split = n_per_split or {"train": 2, "val": 1, "test": 1}
    start = 0
    for split, n in n_per_split.items():
        ids = [f"{i:06d}" for i in range(start, start + n)]
        start += n
        hot = {i: int(i) % 3 for i in ids}  # classes 0..2 positive, in colour 0..2
        for k, c in enumerate(VOC_CLASSES):
            write_lines(os.path.join(base, "ImageSets", "Main", f"{c}_{split}.txt"),
                        [f"{i} {' 1' if hot[i] == k else ('0' if k == 5 else '-1')}" for i in ids])
        for i in ids:
            colour_image(os.path.join(base, "JPEGImages", f"{i}.jpg"), COLOURS[hot[i]], rng, image_size)
    return {"classes": 20, "train": n_per_split["train"], "val": n_per_split["val"], "test": n_per_split["test"],
            "first_train_label": None}


def make_cub(root, rng):
    base = os.path.join(root, "CUB_200_2011")
    names = ["001.Albatross/a.jpg", "002.Auklet/b.jpg", "002.Auklet/c.jpg"]
    write_lines(os.path.join(base, "images.txt"), [f"{i + 1} {n}" for i, n in enumerate(names)])
    write_lines(os.path.join(base, "image_class_labels.txt"), ["1 1", "2 2", "3 2"])
    write_lines(os.path.join(base, "train_test_split.txt"), ["1 1", "2 0", "3 1"])
    for n in names:
        colour_image(os.path.join(base, "images", n), COLOURS[0], rng, 8)
    return {"classes": 2, "train": 2, "val": None, "test": 1, "first_train_label": 0}


def make_imagefolder(root, rng, per_class=(2, 1), size=8, classes=2):
    for split, n in zip(("train", "test"), per_class):
        for c in range(classes):
            for i in range(n):
                colour_image(os.path.join(root, split, f"class{c}", f"{i}.png"), COLOURS[c], rng, size)
    return {"classes": classes, "train": classes * per_class[0], "val": None, "test": classes * per_class[1],
            "first_train_label": 0}


MAKERS = {"aircraft": make_aircraft, "caltech101": make_caltech101, "cars": make_cars, "cifar10": make_cifar10,
          "cifar100": make_cifar100, "dtd": make_dtd, "flowers": make_flowers, "food": make_food, "pets": make_pets,
          "sun397": make_sun397, "voc2007": make_voc2007, "cub": make_cub, "imagefolder": make_imagefolder}


def test_every_registry_entry_has_a_synthetic_format():
    assert set(MAKERS) == set(DATASETS)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_parse_on_disk_format(name, tmp_path):
    expect = MAKERS[name](str(tmp_path), np.random.default_rng(0))
    parsed = DATASETS[name].load(str(tmp_path))
    assert len(parsed.classes) == expect["classes"]
    assert len(parsed.train) == expect["train"] and len(parsed.test) == expect["test"]
    assert (parsed.val is None) == (expect["val"] is None)
    if parsed.val is not None:
        assert len(parsed.val) == expect["val"]
    img, target = parsed.train[0]
    assert img.size[0] > 0
    if expect["first_train_label"] is not None:
        assert int(target) == expect["first_train_label"]


def test_voc_targets_treat_difficult_as_negative(tmp_path):
    make_voc2007(str(tmp_path), np.random.default_rng(0))
    parsed = DATASETS["voc2007"].load(str(tmp_path))
    target = parsed.train[0][1]  # image 000000: class 0 positive, class 5 "difficult" (0) -> negative
    assert target.shape == (20,) and target[0] == 1 and target.sum() == 1


@pytest.mark.parametrize("name", ["aircraft", "cifar10", "voc2007", "imagefolder", "sun397"])
def test_missing_root_names_the_layout(name, tmp_path):
    with pytest.raises(DatasetLayoutError) as err:
        DATASETS[name].load(str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert "must look like" in msg and "How to obtain" in msg and "nothing is downloaded" in msg
    assert DATASETS[name].layout.strip().split("/")[1] in msg


def test_malformed_root_names_the_layout(tmp_path):
    make_aircraft(str(tmp_path), np.random.default_rng(0))
    os.remove(tmp_path / "fgvc-aircraft-2013b" / "data" / "images_variant_val.txt")
    with pytest.raises(DatasetLayoutError, match="images_variant_val.txt"):
        DATASETS["aircraft"].load(str(tmp_path))


def test_cifar_fixture_is_in_the_official_format(tmp_path):
    """The files load as the CIFAR page says (encoding="bytes": bytes keys), and the images round-trip."""
    make_cifar10(str(tmp_path), np.random.default_rng(0))
    base = tmp_path / "cifar-10-batches-py"
    with open(base / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (2, 3072)
    assert b"numpy.core.multiarray" in (base / "data_batch_1").read_bytes()  # the name numpy 1.x wrote
    parsed = DATASETS["cifar10"].load(str(tmp_path))
    assert parsed.classes[:2] == ["c0", "c1"]
    assert np.array_equal(np.asarray(parsed.train[0][0]), batch[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_re_pickled_by_python3_loads(tmp_path, protocol):
    """A file re-saved by Python 3 (bytes keys; protocol 2 writes bytes via _codecs, 5 arrays via _frombuffer)."""
    make_cifar10(str(tmp_path), np.random.default_rng(0))
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    parsed = DATASETS["cifar10"].load(str(tmp_path))
    assert len(parsed.test) == 3 and np.array_equal(parsed.test.images.reshape(3, -1),
                                                    batch[b"data"].reshape(3, 3, 32, 32).transpose(0, 2, 3, 1)
                                                    .reshape(3, -1))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_pickle_payload_is_refused_without_running(tmp_path, capsys):
    make_cifar10(str(tmp_path), np.random.default_rng(0))
    marker = tmp_path / "MARK"
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Payload(marker), "labels": [0]}, protocol=2))
    rc = fg_main.main(["--dataset", "cifar10", "--data-root", str(tmp_path), "--output-dir", str(tmp_path / "o"),
                       "--arch", "vit_tiny", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert err.count("error:") == 1 and "Traceback" not in err
    assert str(path) in err and "posix.system" in err and "refused" in err


def test_holdout_split_is_the_seeded_80_20():
    train, val = holdout_split(10)
    idx = np.arange(10)
    np.random.RandomState(0).shuffle(idx)
    assert list(val) == list(idx[:2]) and list(train) == list(idx[2:])
    assert sorted(np.concatenate([train, val])) == list(range(10))


# ---------------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------------

def run_main(tmp_path, dataset, root, *extra):
    out = tmp_path / f"out_{dataset}"
    argv = ["--dataset", dataset, "--data-root", str(root), "--arch", "vit_tiny", "--output-dir", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--image-size", "28", "--num-workers", "0",
            "--model-kwargs", json.dumps(TINY), "--batch-size", "64", *extra]
    results = fg_main.run(argv)
    with open(out / "results.json") as f:
        assert json.load(f)["test_score"] == pytest.approx(results["test_score"])
    return results


def test_colour_classes_random_init_and_feature_cache(tmp_path):
    root = tmp_path / "colours"
    make_imagefolder(str(root), np.random.default_rng(0), per_class=(20, 10), size=32, classes=4)
    results = run_main(tmp_path, "imagefolder", root, "--pretrained", "none")
    assert results["dataset"] == "imagefolder" and results["metric"] == "accuracy"
    assert results["test_score"] >= 95.0
    assert results["sizes"] == {"train": 64, "val": 16, "trainval": 80, "test": 40}
    caches = sorted(os.listdir(tmp_path / "cache"))
    assert len(caches) == 2  # train + test (val is 20 % of train)
    stamp = {c: os.path.getmtime(tmp_path / "cache" / c) for c in caches}
    again = run_main(tmp_path, "imagefolder", root, "--pretrained", "none")
    assert again["test_score"] == results["test_score"]
    assert {c: os.path.getmtime(tmp_path / "cache" / c) for c in caches} == stamp  # read, not rewritten


def test_checkpoint_content_keys_the_cache(tmp_path):
    root = tmp_path / "colours"
    make_imagefolder(str(root), np.random.default_rng(0), per_class=(5, 2), size=28, classes=2)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = models.build_vit("vit_tiny", patch_size=14, img_size=28, **TINY)
        paths.append(str(tmp_path / f"ckpt{seed}.pth"))
        torch.save(model.state_dict(), paths[-1])
    from common.checkpoint import file_fingerprint

    for path in paths:  # results.json records the weights by content (tools.export's model card matches on it)
        assert run_main(tmp_path, "imagefolder", root, "--pretrained", path)["backbone"]["weights"] == \
            file_fingerprint(path)
    assert len(os.listdir(tmp_path / "cache")) == 4  # different weights -> different entries


def test_voc_end_to_end_with_multiple_features(tmp_path):
    root = tmp_path / "voc"
    make_voc2007(str(root), np.random.default_rng(0), {"train": 18, "val": 9, "test": 9}, image_size=28)
    results = run_main(tmp_path, "voc2007", root, "--pretrained", "none", "--multiple",
                       "--model-kwargs", json.dumps({**TINY, "depth": 4}))
    assert results["metric"] == "voc_map_11pt"
    assert 0.0 <= results["test_score"] <= 100.0
    assert len(results["val_scores"]) == 45


def test_cli_missing_root_is_a_layout_error(tmp_path):
    with pytest.raises(DatasetLayoutError, match="ROOT/train/<class>"):
        fg_main.run(["--dataset", "imagefolder", "--data-root", str(tmp_path / "none"), "--output-dir",
                      str(tmp_path / "o"), "--arch", "vit_tiny"])


def test_summary_table_averages_the_12_datasets(tmp_path):
    from fine_grained import summarize
    from fine_grained.datasets import PAPER_DATASETS

    for i, d in enumerate(PAPER_DATASETS):
        os.makedirs(tmp_path / d)
        with open(tmp_path / d / "results.json", "w") as f:
            json.dump({"dataset": d, "metric": "accuracy", "test_score": float(i)}, f)
    def average():
        assert summarize.main([str(tmp_path)]) == 0
        return json.load(open(tmp_path / "summary.json"))["average"]

    assert average() == pytest.approx(sum(range(12)) / 12)
    os.remove(tmp_path / "cub" / "results.json")
    assert average() is None  # no partial average
    assert summarize.main([str(tmp_path / "missing")]) == 2  # a user error: one message, exit 2


# ---------------------------------------------------------------------------------------------------
# the feature cache never serves stale features or labels
# ---------------------------------------------------------------------------------------------------

def test_fingerprint_follows_content_not_path(tmp_path):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    torch.save({"w": torch.zeros(2)}, a)
    shutil.copy(a, b)  # same bytes, another path
    fa, fb = (backbone_fingerprint(backbone_identity(str(p), "vit_tiny", 14, TINY)) for p in (a, b))
    assert fa == fb
    torch.save({"w": torch.ones(2)}, b)
    assert backbone_fingerprint(backbone_identity(str(b), "vit_tiny", 14, TINY)) != fa




def file_facts(root):
    """(relative path, size, mtime_ns) of every test file, and the parsed labels: what the renames keep."""
    parsed = DATASETS["imagefolder"].load(str(root))
    stats = [(os.path.relpath(p, root), os.stat(p)) for p in parsed.test.paths]
    return [(p, st.st_size, st.st_mtime_ns) for p, st in stats], parsed.test.targets


def test_cache_misses_when_two_class_folders_swap_names(tmp_path):
    root, rng = tmp_path / "colours", np.random.default_rng(0)
    for split, n in (("train", 10), ("test", 4)):
        for c in range(2):  # BMP: every file the same size; one timestamp for all, as a tar extraction leaves
            for i in range(n):
                path = os.path.join(root, split, f"class{c}", f"{i}.bmp")
                colour_image(path, COLOURS[c], rng, 28)
                os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    assert run_main(tmp_path, "imagefolder", root, "--pretrained", "none")["test_score"] == 100.0
    before = file_facts(root)
    test = root / "test"
    os.rename(test / "class0", test / "tmp")  # the trap: mv a tmp; mv b a; mv tmp b
    os.rename(test / "class1", test / "class0")
    os.rename(test / "tmp", test / "class1")
    assert file_facts(root) == before  # same paths, sizes, mtimes and labels: only the files behind them moved
    swapped = run_main(tmp_path, "imagefolder", root, "--pretrained", "none")
    assert swapped["test_score"] == 0.0  # every red image is now labelled green and vice versa
    assert len(os.listdir(tmp_path / "cache")) == 3  # train reused, test extracted again


def make_caltech_colours(root, rng, n_train=10, n_test=4):
    lines = {"train": [], "test": []}
    for label, cls in enumerate(("accordion", "bass")):
        for i in range(n_train + n_test):
            colour_image(os.path.join(root, "101_ObjectCategories", cls, f"image_{i:04d}.jpg"), COLOURS[label], rng, 28)
            lines["train" if i < n_train else "test"].append(f"{cls}/image_{i:04d}.jpg {label}")
    for split, rows in lines.items():
        write_lines(os.path.join(root, f"{split}.txt"), rows)
    return lines


def test_cache_misses_when_test_labels_change(tmp_path):
    root = tmp_path / "caltech"
    lines = make_caltech_colours(str(root), np.random.default_rng(0))
    assert run_main(tmp_path, "caltech101", root, "--pretrained", "none")["test_score"] == 100.0
    flipped = [f"{path} {1 - int(label)}" for path, label in (ln.rsplit(" ", 1) for ln in lines["test"])]
    write_lines(os.path.join(root, "test.txt"), flipped)  # same files, swapped labels
    assert run_main(tmp_path, "caltech101", root, "--pretrained", "none")["test_score"] == 0.0


def test_cache_misses_when_an_image_is_rewritten_in_place(tmp_path):
    root = tmp_path / "colours"
    make_imagefolder(str(root), np.random.default_rng(0), per_class=(10, 1), size=28, classes=2)
    run_main(tmp_path, "imagefolder", root, "--pretrained", "none")
    target = root / "test" / "class0" / "0.png"
    stamp = os.stat(target)
    colour_image(str(target), COLOURS[1], np.random.default_rng(1), 28)  # now a class-1 image
    os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # mtime put back: only size/ctime tell
    assert run_main(tmp_path, "imagefolder", root, "--pretrained", "none")["test_score"] == 50.0


def test_default_cache_is_outside_the_repo_and_a_broken_cache_is_re_extracted(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "colours"
    make_imagefolder(str(root), np.random.default_rng(0), per_class=(10, 2), size=28, classes=2)
    argv = ["--dataset", "imagefolder", "--data-root", str(root), "--arch", "vit_tiny", "--output-dir",
            str(tmp_path / "out"), "--image-size", "28", "--num-workers", "0", "--model-kwargs", json.dumps(TINY),
            "--precision", "fp32"]
    first = fg_main.run(argv)
    cache = tmp_path / "xdg" / "proteus" / "fine_grained"
    files = sorted(os.listdir(cache))
    assert len(files) == 2 and first["precision"] == "fp32"
    with open(tmp_path / "out" / "config.json") as f:
        config = json.load(f)
    assert config["tool"] == "fine_grained" and config["precision_resolved"] == "fp32"
    with open(cache / files[0], "wb") as f:
        f.write(b"not a tensor file")
    assert fg_main.run(argv)["test_score"] == first["test_score"]
    assert torch.load(cache / files[0], weights_only=True)["cls"].shape[0] > 0  # rewritten whole


def test_precision_auto_follows_the_cpu_and_keys_the_cache(tmp_path, monkeypatch):
    root = tmp_path / "colours"
    make_imagefolder(str(root), np.random.default_rng(0), per_class=(10, 2), size=28, classes=2)
    monkeypatch.setenv("PROTEUS_CPU_BF16", "0")
    assert run_main(tmp_path, "imagefolder", root, "--pretrained", "none")["precision"] == "fp32"
    monkeypatch.setenv("PROTEUS_CPU_BF16", "1")
    res = run_main(tmp_path, "imagefolder", root, "--pretrained", "none")
    assert res["precision"] == "bf16" and "PROTEUS_CPU_BF16=1" in res["precision_reason"]
    assert len(os.listdir(tmp_path / "cache")) == 4  # bf16 features are not fp32 features
