"""The ``detectflow`` command line (Typer). Each command validates its arguments at the edge and
calls the data plane (``pipeline``) or the detector."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="detectflow",
    help="Distributed batch object detection: ingest images into Parquet shards, train a Faster R-CNN "
    "on Ray, run batch inference, evaluate, query and look at the results.",
    no_args_is_help=True,
    add_completion=False,
)
ingest_app = typer.Typer(
    help="Turn images in object storage into a dataset of Parquet image shards.", no_args_is_help=True
)
app.add_typer(ingest_app, name="ingest")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
