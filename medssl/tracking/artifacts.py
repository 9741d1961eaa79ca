"""Download a file or folder named by an MLflow URI (``runs:/…``, ``models:/name@alias|/N``, any artifact URI)."""

from __future__ import annotations

from pathlib import Path

from medssl.errors import MedsslError

__all__ = ["download_uri"]


def download_uri(src: str, dst: str | Path, *, tracking_uri: str | None = None, what: str = "artifact",
                 shown: str | None = None) -> Path:
    """Download ``src`` into ``dst``; returns the local file or folder. ``models:/`` URIs are resolved through the
    registry of the same store (name + version or alias).

    Raises:
        MedsslError: the URI cannot be resolved or downloaded (the message names ``what``, the URI — ``shown``
            if given, e.g. what the user typed — and the store).
    """
    import mlflow

    from medssl.tracking.mlflow_tracker import default_tracking_uri

    uri = tracking_uri or default_tracking_uri()
    target = src
    try:
        if target.startswith("models:/"):
            from mlflow.store.artifact.utils.models import get_model_name_and_version

            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            name, version = get_model_name_and_version(client, target)
            target = client.get_model_version_download_uri(name, version)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=target, dst_path=str(dst), tracking_uri=uri))
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; all mean "cannot get it"
        raise MedsslError(f"cannot download {what} {(shown or src)!r} from MLflow at {uri}: {e}") from e
