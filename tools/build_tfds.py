"""Build the TFDS (ArrayRecord) dataset of a directory of `<split>.jsonl` record files, media inside.

    python tools/build_tfds.py --jsonl_dir=DIR --data_dir=OUT
    python -m mrrm_jax.train --config=... --config.data.train=tfds:OUT:train
"""

from absl import app, flags
import tensorflow_datasets as tfds

from mrrm_jax.data import tfds_records

flags.DEFINE_string("jsonl_dir", None, "directory of <split>.jsonl files; media paths relative to it", required=True)
flags.DEFINE_string("data_dir", None, "where the dataset is written", required=True)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    builder = tfds_records.MultiResponseRecords(data_dir=FLAGS.data_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=FLAGS.jsonl_dir))
    for split, info in builder.info.splits.items():
        print(f"{split}: {info.num_examples} records -> {builder.data_dir}")


if __name__ == "__main__":
    app.run(main)
