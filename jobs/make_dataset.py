"""Write a data set (procedural, image folder, parquet table, MedMNIST .npz or the IHC smoke set) as parquet shards.

python jobs/make_dataset.py --config configs/make_dataset.yaml source=folder path=/data/cells out_dir=runs/x/data
"""

import sys

from pathalign_ray.config import parse_job_args
from pathalign_ray.data.make import MakeDatasetConfig, make_dataset


def main(argv=None) -> None:
    config = parse_job_args(MakeDatasetConfig, argv, "configs/make_dataset.yaml", __doc__)
    out_dir = make_dataset(config)
    print(f"data set written to {out_dir} (contact sheet: {out_dir / 'contact_sheet.png'})")


if __name__ == "__main__":
    main(sys.argv[1:])
