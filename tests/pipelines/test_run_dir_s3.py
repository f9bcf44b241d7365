"""--force on a run folder in an object store (moto's S3 server): a whole bucket is never
removed, a prefix only when it is a marked run folder or empty (issue 23, defect 5)."""
import pytest

from twa_ray.config import ConfigError, config_from_dict
from twa_ray.output.atomic import write_json
from twa_ray.pipelines.runs import RUN_MARKER, prepare_run_dir
from twa_ray.store import fs as store_fs


def test_force_on_s3_spares_the_bucket_and_what_is_no_run_folder(s3_uri):
    write_json(store_fs.join(s3_uri, "data", "keep.json"), {})
    with pytest.raises(ConfigError, match=r"output_dir: s3://.* is a whole bucket"):
        prepare_run_dir(config_from_dict({"output_dir": s3_uri}), force=True)
    with pytest.raises(ConfigError, match=r"output_dir: .*data.* is not a run folder of twa_ray"):
        prepare_run_dir(config_from_dict({"output_dir": store_fs.join(s3_uri, "data")}), force=True)
    assert store_fs.file_exists(store_fs.join(s3_uri, "data", "keep.json"))

    cfg = config_from_dict({"output_dir": store_fs.join(s3_uri, "run")})
    run = prepare_run_dir(cfg)
    assert store_fs.files_in(run) == [(RUN_MARKER, store_fs.files_in(run)[0][1])]
    write_json(run / "model" / "partial.json", {})  # a run that died early
    assert prepare_run_dir(cfg, force=True) == run
    assert [name for name, _ in store_fs.files_in(run)] == [RUN_MARKER] and store_fs.files_in(run / "model") == []
