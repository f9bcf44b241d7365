"""Where a job's results and data are: every location settled once, where the config loads.

A config's locations are ``output_dir`` (the run folder, default runs/<name>), ``store``
(the candidate store, default <run folder>/candidates), ``data.root`` and ``storage_root``.
``settle_locations`` makes each absolute (a local path, ``~`` expanded, or a URI) in the
driver; ``cli.common.load_job_config`` calls it for every job. From then on
``cfg.run_dir``, ``cfg.store_uri``, ``cfg.ray_storage`` and ``cfg.data.root`` are used as
they are: by the driver, and by Ray workers, which rebuild the config from
``config_to_dict(cfg)`` in another working directory (an absolute location is never
resolved again).

- ``output_dir`` and ``store`` resolve against the storage root (``resolve_storage``):
  ``storage_root``, else TWA_RAY_STORAGE_ROOT, else, off a Ray cluster, the working
  directory; on a cluster without a root a relative one is refused.
- ``data.root`` resolves against the driver's working directory (under ``ray job submit
  --working-dir``, Ray's copy of it: where the job's own files are).
- ``storage_root`` becomes the root the others resolved against (None on a cluster
  without one, where every location was absolute already).
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
from typing import Mapping

from .schema import Config, ConfigError

STORAGE_ROOT_ENV = "TWA_RAY_STORAGE_ROOT"


def on_cluster(environ: Mapping[str, str] | None = None) -> bool:
    """True when the job joins a Ray cluster: ``RAY_ADDRESS`` is set (``ray job submit`` sets
    it for every driver it starts, and ``runtime.ray_env.init_ray`` then joins it)."""
    return bool((os.environ if environ is None else environ).get("RAY_ADDRESS"))


def is_absolute_location(location: str) -> bool:
    """A URI (``s3://...``, ``file://...``) or an absolute local path (``~`` expanded)."""
    return "://" in location or os.path.isabs(os.path.expanduser(location))


def _under(root: str, relative: str) -> str:
    relative = posixpath.normpath(relative.replace(os.sep, "/"))
    if "://" in root:
        from ..store import fs as store_fs  # a URI root may end in ?query (an S3 endpoint): join keeps it last

        return store_fs.join(root, relative)
    return os.path.join(os.path.expanduser(root), relative)


def _absolute(location: str, base: str) -> str:
    """``location`` as an absolute local path (``~`` expanded, relative to ``base``), or the URI."""
    if "://" in location:
        return location
    return os.path.normpath(os.path.join(base, os.path.expanduser(location)))


def resolve_storage(cfg: Config, environ: Mapping[str, str] | None = None) -> Config:
    """``cfg`` with ``output_dir`` and ``store`` settled where the job writes them
    (``settle_locations`` starts with it).

    - A storage root: ``storage_root``, else the environment variable TWA_RAY_STORAGE_ROOT
      (an absolute path or a URI). A relative ``output_dir`` (the default ``runs/<name>``
      too) and a relative ``store`` resolve against it, as if it were the working directory.
    - No root, on a Ray cluster (``on_cluster``): a relative one raises ConfigError naming
      storage_root, TWA_RAY_STORAGE_ROOT and the key. ``ray job submit --working-dir`` runs
      the driver in Ray's unpacked copy of the working dir on whichever node it picked:
      results under a relative path would land there, not where the user looks.
    - No root, not on a cluster: ``cfg`` unchanged (relative to the working directory).

    Absolute paths and URIs are used as given.
    """
    environ = os.environ if environ is None else environ
    root, source = cfg.storage_root, "storage_root"
    if not root:
        root, source = environ.get(STORAGE_ROOT_ENV) or None, STORAGE_ROOT_ENV
    if root is not None and not is_absolute_location(root):
        raise ConfigError(f"{source}: {root!r} is not an absolute path or a URI "
                          "(e.g. /shared/twa or s3://bucket/prefix)")
    relative = {}
    if cfg.output_dir is None or not is_absolute_location(cfg.output_dir):
        relative["output_dir"] = cfg.run_dir
    if cfg.store is not None and not is_absolute_location(cfg.store):
        relative["store"] = cfg.store
    if not relative or (root is None and not on_cluster(environ)):
        return cfg
    if root is None:
        default = " (the default runs/<name>)" if cfg.output_dir is None else ""
        named = ", ".join(f"{key} {path!r}" + (default if key == "output_dir" else "") for key, path in relative.items())
        raise ConfigError(
            f"{named} {'is' if len(relative) == 1 else 'are'} relative, and this job runs on a Ray cluster "
            "(RAY_ADDRESS is set): it would land in Ray's copy of the working dir on whichever node ran the driver. "
            "Set a storage root once, an absolute "
            f"path every node shares or a URI such as s3://bucket/prefix: the config key storage_root (or the "
            f"override storage_root=...) or the environment variable {STORAGE_ROOT_ENV}; or give an absolute "
            "output_dir."
        )
    return dataclasses.replace(cfg, **{key: _under(root, path) for key, path in relative.items()})


def settle_locations(cfg: Config, environ: Mapping[str, str] | None = None, cwd: str | None = None) -> Config:
    """``cfg`` with every location absolute (see the module's docstring), in the driver,
    once: ``output_dir`` (set even when it was the default runs/<name>), ``store`` (when
    given; ``store_uri`` follows ``output_dir`` otherwise), ``data.root`` and
    ``storage_root``. ``cwd``: the working directory relative locations resolve against
    without a storage root (default: this process's). Raises ConfigError as
    ``resolve_storage`` does. A settled config comes back equal: settling is idempotent,
    in any working directory."""
    environ = os.environ if environ is None else environ
    cfg = resolve_storage(cfg, environ)
    here = os.path.abspath(os.path.expanduser(os.getcwd() if cwd is None else cwd))
    root = cfg.storage_root or environ.get(STORAGE_ROOT_ENV) or (None if on_cluster(environ) else here)
    return dataclasses.replace(
        cfg,
        storage_root=None if root is None else _absolute(root, here),
        output_dir=_absolute(cfg.run_dir, here),
        store=None if cfg.store is None else _absolute(cfg.store, here),
        data=dataclasses.replace(cfg.data, root=_absolute(cfg.data.root, here)),
    )


def unsettled_locations(cfg: Config) -> list[str]:
    """The location keys of ``cfg`` that are not absolute yet ([] once ``settle_locations``
    ran): what a worker in another working directory would find elsewhere."""
    locations = {"output_dir": cfg.run_dir, "store": cfg.store_uri, "data.root": cfg.data.root,
                 "storage_root": cfg.storage_root}
    return [key for key, location in locations.items()
            if location is not None and not ("://" in location or os.path.isabs(location))]
