"""Sources, the embedded dataset, level maps and the grain pipelines (cat_jax.data)."""

import io
import json
from collections import Counter

import jax
import numpy as np
import pytest
from PIL import Image

from cat_jax.data import (EmbeddedSource, decode_image, get_source, load_levels,
                          make_eval_iterator, make_global_batch, make_train_iterator,
                          resolve_levels)
from cat_jax.data.embedded import KINDS, generate

# Embedded dataset ---------------------------------------------------------------------------


def test_embedded_is_deterministic_and_seeded():
  a = EmbeddedSource("train", num_images=16, image_size=64)
  b = EmbeddedSource("train", num_images=16, image_size=64)
  other_seed = EmbeddedSource("train", num_images=16, image_size=64, seed=1)
  other_split = EmbeddedSource("validation", num_images=16, image_size=64)
  for i in (1, 3, 6, 7):  # gradient, many shapes, texture, dense text: all random.
    assert a[i]["image"] == b[i]["image"] and a[i]["caption"] == b[i]["caption"]
    assert not np.array_equal(decode_image(a[i]["image"]), decode_image(other_seed[i]["image"]))
    assert not np.array_equal(decode_image(a[i]["image"]), decode_image(other_split[i]["image"]))
  assert len(set(a.ids() + other_seed.ids() + other_split.ids())) == 48
  assert a.ids() == [a[i]["id"] for i in range(16)]


def test_embedded_records_have_images_and_kind_specific_captions():
  source = get_source("embedded", "train", num_images=len(KINDS) * 2, image_size=96)
  assert len(source) == len(KINDS) * 2
  words = {"flat": "plain", "gradient": "gradient", "few_shapes": "shape",
           "many_shapes": "shapes", "photo": "photograph", "chart": "chart",
           "texture": "texture", "dense_text": "text"}
  for i in range(len(source)):
    record = source[i]
    image = decode_image(record["image"])
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    kind = KINDS[i % len(KINDS)]
    assert record["kind"] == kind.name
    caption = record["caption"].lower()
    assert words[kind.name] in caption or (kind.name == "photo" and "image" in caption), caption
  with pytest.raises(IndexError):
    source[len(source)]


def test_embedded_generates_every_kind_at_small_sizes():
  # Train image 53 is a bar chart with 12 points and 3 series: bars under a pixel wide at 32x32 (once a crash).
  for size in (16, 32):
    for i in (13, 53, 69, 85):
      for split in ("train", "validation"):
        image, _, kind = generate(i, split=split, image_size=size)
        assert image.shape == (size, size, 3), (i, split, kind.name)
  assert generate(53, image_size=32)[2].name == "chart"


def test_embedded_simple_images_are_really_simpler_by_jpeg_size():
  sizes = {k.name: [] for k in KINDS}
  for i in range(len(KINDS) * 6):
    arr, _, kind = generate(i, image_size=256)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=75)
    sizes[kind.name].append(len(buf.getvalue()))
  by_level = {l: [s for k in KINDS if k.level == l for s in sizes[k.name]] for l in range(3)}
  means = [np.mean(by_level[l]) for l in range(3)]
  # Level 0 (8x, complex) > level 1 (16x) > level 2 (32x, simple), by a wide margin.
  assert means[0] > 1.2 * means[1] > 1.2 * 2 * means[2], means
  # Every simple image is smaller than every image of the most complex kinds.
  assert max(by_level[2]) < min(sizes["dense_text"] + sizes["many_shapes"])
  assert np.mean(sizes["flat"]) < np.mean(sizes["gradient"]) < np.mean(sizes["many_shapes"])
  assert np.mean(sizes["few_shapes"]) < np.mean(sizes["many_shapes"])


def test_embedded_builtin_levels_follow_kinds():
  source = EmbeddedSource("train", num_images=40, image_size=32)
  levels = source.builtin_levels()
  assert [levels[i] for i in source.ids()] == [KINDS[i % 8].level for i in range(40)]
  assert set(levels.values()) == {0, 1, 2}


# Folder, ChartQA and TFDS sources ----------------------------------------------------------


def write_image(path, size=(40, 30), colour=(10, 200, 30), fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, colour).save(path, format=fmt)


def test_folder_source_recursive_extensions_and_captions(tmp_path):
  for rel in ("a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.bmp", "sub/e.jpeg"):
    write_image(tmp_path / rel, fmt={"jpg": "JPEG", "jpeg": "JPEG"}.get(rel.split(".")[-1]))
  (tmp_path / "notes.txt").write_text("not an image")
  (tmp_path / "captions.jsonl").write_text(
      json.dumps({"path": "a.jpg", "caption": "a green jpeg"}) + "\n"
      + json.dumps({"file": "sub/c.webp", "caption": "a webp"}) + "\n")
  source = get_source("folder", "train", path=str(tmp_path), captions_file="captions.jsonl")
  assert source.ids() == ["a.jpg", "b.PNG", "sub/c.webp", "sub/deeper/d.bmp", "sub/e.jpeg"]
  assert source[0]["caption"] == "a green jpeg" and source[2]["caption"] == "a webp"
  assert "caption" not in source[1]
  np.testing.assert_allclose(decode_image(source[3]["image"])[0, 0], (10, 200, 30), atol=0)
  (tmp_path / "caps.tsv").write_text("sub/e.jpeg\tsome caption\twith a tab\n")
  tsv = get_source("folder", "train", path=str(tmp_path), captions_file=str(tmp_path / "caps.tsv"))
  assert tsv[4]["caption"] == "some caption\twith a tab"


def test_folder_source_split_subfolders_and_errors(tmp_path):
  write_image(tmp_path / "train" / "x.png")
  write_image(tmp_path / "validation" / "y.png")
  assert get_source("folder", "validation", path=str(tmp_path)).ids() == ["y.png"]
  assert get_source("folder", "train", path=str(tmp_path)).ids() == ["x.png"]
  with pytest.raises(FileNotFoundError, match="no 'test' subfolder"):
    get_source("folder", "test", path=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    get_source("folder", "train", path=str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no images"):
    get_source("folder", "train", path=str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="unknown source"):
    get_source("imagenet", "train")


def test_chartqa_source_reads_release_layout(tmp_path):
  root = tmp_path / "ChartQA Dataset"
  for name in ("1001.png", "2002.png"):
    write_image(root / "val" / "png" / name, size=(80, 60))
  (root / "val" / "annotations").mkdir()
  (root / "val" / "annotations" / "1001.json").write_text(json.dumps(
      {"type": "v_bar", "general_figure_info": {"title": {"text": "Sales by year "}}}))
  source = get_source("chartqa", "validation", path=str(tmp_path))
  assert source.ids() == ["chartqa/val/1001.png", "chartqa/val/2002.png"]
  assert source[0]["caption"] == "A vertical bar chart titled 'Sales by year'."
  assert "caption" not in source[1]
  assert decode_image(source[1]["image"]).shape == (60, 80, 3)
  with pytest.raises(FileNotFoundError, match="huggingface.co/datasets/ahmed-masry/ChartQA"):
    get_source("chartqa", "train", path=str(tmp_path))


def test_missing_tfds_dataset_explains_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    get_source("tfds:imagenet2012", "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert "manual_dir" in message and "ILSVRC2012_img_train.tar" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message
  with pytest.raises(FileNotFoundError, match="tfds build celeb_a"):
    get_source("tfds:celeb_a", "train", data_dir=str(tmp_path))


def test_tfds_source_reads_a_prepared_dataset(tmp_path):
  import tensorflow_datasets as tfds

  class CatJaxTinyImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(None, None, 3)), "file_name": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(5):
        buf = io.BytesIO()  # Pre-encoded: encoding arrays would need TensorFlow.
        Image.new("RGB", (30 + i, 20), (40 * i, 0, 0)).save(buf, "PNG")
        yield i, {"image": buf.getvalue(), "file_name": f"img{i}.png"}

  CatJaxTinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = get_source("tfds:cat_jax_tiny_images", "train", data_dir=str(tmp_path))
  assert len(source) == 5
  assert source.ids() == [f"cat_jax_tiny_images/train/{i}" for i in range(5)]
  records = [source[i] for i in range(5)]
  widths = sorted(decode_image(r["image"]).shape[1] for r in records)
  assert widths == [30, 31, 32, 33, 34]
  assert sorted(r["file_name"] for r in records) == [f"img{i}.png" for i in range(5)]
  batches = list(make_eval_iterator(source, levels=1, batch_size=2, image_size=16, min_size=16,
                                    process_index=0, process_count=1))
  assert sorted(i for b in batches for i in b["id"][b["mask"]]) == source.ids()


# Level maps ----------------------------------------------------------------------------------


def write_manifest(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def test_load_levels_reads_and_validates(tmp_path):
  good = write_manifest(tmp_path / "m.jsonl", [{"id": "a", "level": 0, "score": 8},
                                              {"id": "b", "level": 2}, {"id": "a", "level": 0}])
  assert load_levels(good) == {"a": 0, "b": 2}
  assert load_levels(good, known_ids=["a", "b", "c"]) == {"a": 0, "b": 2}
  with pytest.raises(ValueError, match=r"m.jsonl:2: id 'b' is not in the dataset"):
    load_levels(good, known_ids=["a"])
  cases = {"level": [{"id": "a", "level": 3}], "level must be": [{"id": "a", "level": "4x"}],
           "needs 'id' and 'level'": [{"id": "a", "score": 3}],
           "not valid JSON": ["{broken"], "listed again": [{"id": "a", "level": 0},
                                                          {"id": "a", "level": 1}]}
  for match, rows in cases.items():
    with pytest.raises(ValueError, match=match):
      load_levels(write_manifest(tmp_path / "bad.jsonl", rows))
  with pytest.raises(ValueError, match="level"):
    load_levels(write_manifest(tmp_path / "bool.jsonl", [{"id": "a", "level": True}]))
  with pytest.raises(FileNotFoundError):
    load_levels(str(tmp_path / "nope.jsonl"))
  # Failure lines written by cat_jax.score are left out; their images then have no level.
  with_failure = write_manifest(tmp_path / "f.jsonl", [{"id": "a", "level": 1, "method": "jpeg"},
                                                       {"id": "b", "method": "caption_llm", "error": "timeout"}])
  assert load_levels(with_failure) == {"a": 1}
  source = EmbeddedSource("train", num_images=2, image_size=32)
  rows = [{"id": source.ids()[0], "level": 1}, {"id": source.ids()[1], "method": "jpeg", "error": "x"}]
  with pytest.raises(ValueError, match="score failed"):
    resolve_levels(source, write_manifest(tmp_path / "g.jsonl", rows))


def test_resolve_levels_from_manifest_int_and_builtin(tmp_path):
  source = EmbeddedSource("train", num_images=5, image_size=32)
  rows = [{"id": i, "level": k % 3} for k, i in enumerate(source.ids())]
  np.testing.assert_array_equal(
      resolve_levels(source, write_manifest(tmp_path / "m.jsonl", rows)), [0, 1, 2, 0, 1])
  np.testing.assert_array_equal(resolve_levels(source, 2), [2] * 5)
  np.testing.assert_array_equal(resolve_levels(source, None), [2, 2, 2, 1, 1])
  with pytest.raises(ValueError, match="1 of 5 images .* have no level"):
    resolve_levels(source, {i: 0 for i in source.ids()[:4]})
  with pytest.raises(ValueError, match="level must be"):
    resolve_levels(source, 5)
  # From the command line a fixed level arrives as a string, in either spelling.
  for spelling, level in (("0", 0), ("2", 2), ("16x", 1), ("32", 2), (8, 0)):
    np.testing.assert_array_equal(resolve_levels(source, spelling), [level] * 5)
  with pytest.raises(FileNotFoundError):
    resolve_levels(source, str(tmp_path / "3"))


# Training pipeline -------------------------------------------------------------------------

NUM_IMAGES = 40  # Built-in levels: 15 at level 0, 10 at level 1, 15 at level 2.
BATCH = 4
STEPS = 30  # 120 images per process, several epochs of each shard.


@pytest.fixture(scope="module")
def demo_source():
  return EmbeddedSource("train", num_images=NUM_IMAGES, image_size=32)


def train_iter(source, process_index, process_count, seed=0, **kwargs):
  return make_train_iterator(source, levels=kwargs.pop("levels", None), batch_size=BATCH,
                             image_size=24, seed=seed, process_index=process_index,
                             process_count=process_count, **kwargs)


def global_batches(source, process_count, steps, state=None, **kwargs):
  """``steps`` global batches from ``process_count`` processes' iterators (each with BATCH // process_count
  images): [(level, {id: image})], plus the iterators' states."""
  its = [make_train_iterator(source, levels=kwargs.pop("levels", None), batch_size=BATCH // process_count,
                             image_size=24, seed=kwargs.pop("seed", 0), process_index=p,
                             process_count=process_count, **kwargs) for p in range(process_count)]
  if state is not None:
    for it in its:
      it.set_state(state)
  out = []
  for _ in range(steps):
    parts = [next(it) for it in its]
    assert len({int(b["level"]) for b in parts}) == 1, "processes drew different levels"
    ids = [i for b in parts for i in b["id"]]
    out.append((int(parts[0]["level"]), ids, {i: x for b in parts for i, x in zip(b["id"], b["image"])}))
  states = [it.get_state() for it in its]
  assert all(s == states[0] for s in states), "every process must hold the same (global) position"
  return out, states[0]


def _same_global_batches(a, b):
  for (level_a, ids_a, images_a), (level_b, ids_b, images_b) in zip(a, b, strict=True):
    assert level_a == level_b and sorted(ids_a) == sorted(ids_b)
    for i in images_a:
      np.testing.assert_array_equal(images_a[i], images_b[i])  # the same crop, whoever reads it


def test_demo_pipeline_epochs_single_level_batches(demo_source):
  level_of = demo_source.builtin_levels()
  batches, _ = global_batches(demo_source, 1, STEPS)
  for level, ids, images in batches:
    assert len(ids) == BATCH and {level_of[i] for i in ids} == {level}, "batch mixes levels"
    for x in images.values():
      assert x.shape == (24, 24, 3) and x.dtype == np.float32 and -1.0 <= x.min() and x.max() <= 1.0
  # Levels drawn in proportion to their counts 15:10:15 = 3:2:3 (exact per 8-step round).
  counts = Counter(level for level, _, _ in batches[:24])
  assert (counts[0], counts[1], counts[2]) == (9, 6, 9)
  # Within an epoch of a level's stream, every image of the level appears once.
  for level in range(3):
    stream = [i for lvl, ids, _ in batches if lvl == level for i in ids]
    n = sum(1 for v in level_of.values() if v == level)
    assert len(stream) >= n and set(stream[:n]) == {i for i, v in level_of.items() if v == level}


@pytest.mark.parametrize("process_count", [2, 4])
def test_global_order_is_the_same_for_any_process_count(demo_source, process_count):
  reference, _ = global_batches(demo_source, 1, STEPS)
  sharded, _ = global_batches(demo_source, process_count, STEPS)
  _same_global_batches(reference, sharded)


@pytest.mark.parametrize("saved_on, resumed_on", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_restore_onto_another_process_count_continues_the_global_order(demo_source, saved_on, resumed_on):
  reference, _ = global_batches(demo_source, 1, 23)
  _, state = global_batches(demo_source, saved_on, 17)
  resumed, _ = global_batches(demo_source, resumed_on, 6, state=state)
  _same_global_batches(reference[17:], resumed)


def test_seed_changes_order_and_same_seed_repeats(demo_source):
  def ids(seed):
    it = train_iter(demo_source, 0, 1, seed=seed)
    return [next(it)["id"].tolist() for _ in range(6)]

  assert ids(5) == ids(5) and ids(5) != ids(6)


def test_fixed_level_weights_and_forced_level(demo_source):
  it = train_iter(demo_source, 0, 1, level_weights=[1.0, 0.0, 3.0])
  levels = [int(next(it)["level"]) for _ in range(16)]
  assert Counter(levels) == {0: 4, 2: 12}
  forced = train_iter(demo_source, 0, 1, levels=1)
  batches = [next(forced) for _ in range(12)]
  assert {int(b["level"]) for b in batches} == {1}
  assert {i for b in batches for i in b["id"]} == set(demo_source.ids())
  with pytest.raises(ValueError, match="no images"):
    train_iter(demo_source, 0, 1, levels=2, level_weights=[1, 1, 0])
  with pytest.raises(ValueError, match="levels="):  # one level for all is levels=, not a weight
    train_iter(demo_source, 0, 1, level_weights=1)
  with pytest.raises(ValueError, match="process_index"):
    train_iter(demo_source, 2, 2)


def test_all_levels_mode_draws_every_level_from_every_image(demo_source):
  it = train_iter(demo_source, 0, 1, level_mode="all")
  batches = [next(it) for _ in range(30)]
  assert Counter(int(b["level"]) for b in batches) == {0: 10, 1: 10, 2: 10}  # equal weights by default
  for level in range(3):  # each level's stream covers the whole dataset, whatever the images' own levels
    ids = {i for b in batches if int(b["level"]) == level for i in b["id"]}
    assert len(ids) == NUM_IMAGES == len(set(demo_source.ids()) & ids)
  weighted = train_iter(demo_source, 0, 1, level_mode="all", level_weights=[2, 1, 1])
  assert Counter(int(next(weighted)["level"]) for _ in range(16)) == {0: 8, 1: 4, 2: 4}
  spelled = train_iter(demo_source, 0, 1, level_mode="all", level_weights="2,1,1")  # as the command line gives it
  assert Counter(int(next(spelled)["level"]) for _ in range(16)) == {0: 8, 1: 4, 2: 4}
  with pytest.raises(ValueError, match="e.g. '2,1,1'"):
    train_iter(demo_source, 0, 1, level_mode="all", level_weights="equal")
  with pytest.raises(ValueError, match="level_mode"):
    train_iter(demo_source, 0, 1, level_mode="random")
  # A fixed level (the CLI's --config.data.levels=16x on the demo config) wins over 'all': a fixed-rate baseline.
  fixed = train_iter(demo_source, 0, 1, level_mode="all", levels="16x")
  assert {int(next(fixed)["level"]) for _ in range(12)} == {1}
  with pytest.raises(ValueError, match="level_mode='content'"):
    train_iter(demo_source, 0, 1, level_mode="all", levels={i: 0 for i in demo_source.ids()})


def test_heldout_source_is_fixed_and_not_in_the_embedded_dataset():
  from cat_jax.data import embedded, heldout

  source = get_source("heldout", "test", image_size=32, crops_per_image=2)
  assert len(source) == 2 * len(heldout.PICTURES) == len(set(source.ids()))
  first = decode_image(source[0]["image"])
  assert first.shape == (32, 32, 3)
  np.testing.assert_array_equal(first, decode_image(get_source("heldout", "train", image_size=32,
                                                               crops_per_image=2)[0]["image"]))
  assert not np.array_equal(first, decode_image(source[1]["image"]))  # two different crops of one picture
  used = {name for name, _ in embedded._PHOTOS + embedded._TEXTURES}
  assert not used & {name.split(".")[0] for name, _, _ in heldout.PICTURES}


def test_worker_processes_give_the_same_batches_and_restore(demo_source):
  reference = train_iter(demo_source, 0, 1, seed=3)
  expected = [next(reference) for _ in range(6)]
  it = train_iter(demo_source, 0, 1, seed=3, num_workers=2)
  got = [next(it) for _ in range(3)]
  state = it.get_state()
  got += [next(it) for _ in range(3)]
  it.close()
  for e, g in zip(expected, got):
    np.testing.assert_array_equal(e["id"], g["id"])
    np.testing.assert_array_equal(e["image"], g["image"])
  resumed = train_iter(demo_source, 0, 1, seed=3, num_workers=2)
  resumed.set_state(state)
  for e in expected[3:]:
    np.testing.assert_array_equal(next(resumed)["id"], e["id"])
  resumed.close()


def test_iterator_state_saves_with_grains_orbax_handler(demo_source, tmp_path):
  import grain
  import orbax.checkpoint as ocp

  it = train_iter(demo_source, 0, 1)
  for _ in range(5):
    next(it)
  checkpointer = ocp.Checkpointer(grain.checkpoint.CheckpointHandler())
  checkpointer.save(tmp_path / "data", args=grain.checkpoint.CheckpointSave(it))
  expected = next(it)
  fresh = train_iter(demo_source, 0, 1)
  checkpointer.restore(tmp_path / "data", args=grain.checkpoint.CheckpointRestore(fresh))
  got = next(fresh)
  np.testing.assert_array_equal(got["id"], expected["id"])
  np.testing.assert_array_equal(got["image"], expected["image"])


# Evaluation pipeline and global batches --------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_each_image_once_with_padding(demo_source, process_count):
  level_of = demo_source.builtin_levels()
  runs = [list(make_eval_iterator(demo_source, levels=None, batch_size=4, image_size=24,
                                  process_index=p, process_count=process_count))
          for p in range(process_count)]
  assert len({len(r) for r in runs}) == 1, "processes yield different batch counts"
  seen = []
  for batches in runs:
    assert [int(b["level"]) for b in batches] == sorted(int(b["level"]) for b in batches)
    for b in batches:
      assert b["image"].shape == (4, 24, 24, 3) and b["mask"].dtype == bool
      real = b["id"][b["mask"]]
      assert all(level_of[i] == int(b["level"]) for i in real)
      assert not b["image"][~b["mask"]].any() and (b["id"][~b["mask"]] == "").all()
      seen += real.tolist()
  assert sorted(seen) == sorted(demo_source.ids())
  level_seqs = [[int(b["level"]) for b in batches] for batches in runs]
  assert all(seq == level_seqs[0] for seq in level_seqs)


def test_eval_without_padding_yields_smaller_last_batches(demo_source):
  sizes = [(int(b["level"]), len(b["id"])) for b in make_eval_iterator(
      demo_source, levels=None, batch_size=4, image_size=24, pad_last=False,
      process_index=0, process_count=1)]
  assert sizes == [(0, 4), (0, 4), (0, 4), (0, 3), (1, 4), (1, 4), (1, 2),
                   (2, 4), (2, 4), (2, 4), (2, 3)]
  with pytest.raises(ValueError, match="pad_last"):
    make_eval_iterator(demo_source, levels=None, batch_size=4, image_size=24, pad_last=False,
                       process_index=0, process_count=2)


def test_make_global_batch_shards_over_devices(demo_source):
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
  sharding = jax.sharding.NamedSharding(mesh, jax.P("data", None, None, None))
  batch = next(make_eval_iterator(demo_source, levels=None, batch_size=len(devices),
                                  image_size=24, process_index=0, process_count=1))
  out = make_global_batch(batch, sharding)
  assert isinstance(out["level"], int) and out["level"] == int(batch["level"])
  assert out["image"].shape == batch["image"].shape and out["image"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(out["image"]), batch["image"])
  np.testing.assert_array_equal(np.asarray(out["mask"]), batch["mask"])
  assert len(out["mask"].sharding.device_set) == len(devices)
  np.testing.assert_array_equal(out["id"], batch["id"])
