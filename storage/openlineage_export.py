"""Export a run's lineage as OpenLineage RunEvents (START and COMPLETE/FAIL per stage, under a parent flow run).

Each stage is a job ``tokenmill.<stage>``; its inputs and outputs are artifact folders as datasets, with the
content hash in the dataset-version facet and counts in the output-statistics facet. Events go through
``openlineage-python`` (optional extra ``openlineage``): a JSON-lines file, or an HTTP endpoint such as Marquez.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from storage.lineage import LineageStore
from storage.redaction import redact_config
from storage.stage_graph import STAGE_MODULES

PRODUCER = "https://github.com/tokenmill/tokenmill"
NAMESPACE = "tokenmill"


def _uuid(*parts: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "tokenmill/" + "/".join(parts)))


def _client(target: str):
    try:
        from openlineage.client import OpenLineageClient
    except ImportError as err:
        raise RuntimeError("OpenLineage export needs the optional extra: pip install 'tokenmill[openlineage]'") from err
    if target.startswith(("http://", "https://")):
        from openlineage.client.transport.http import HttpConfig, HttpTransport

        return OpenLineageClient(transport=HttpTransport(HttpConfig(url=target)))
    from openlineage.client.transport.file import FileConfig, FileTransport

    return OpenLineageClient(transport=FileTransport(FileConfig(log_file_path=target, append=True)))


def run_events(store: LineageStore, run_id: str) -> list[Any]:
    """The OpenLineage events of one run, in time order."""
    from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
    from openlineage.client.generated import (
        dataset_version_dataset,
        output_statistics_output_dataset,
        parent_run,
        source_code_location_job,
    )

    run = store.run(run_id)
    arts = {(a["stage"], a["fingerprint"]): a for a in store.located(store.query("SELECT * FROM artifacts"))}
    edges = store.query("SELECT * FROM artifact_edges")
    stage_runs = store.query("SELECT * FROM stage_runs WHERE run_id = ? ORDER BY started_at, attempt", [run_id])
    flow_job = Job(namespace=NAMESPACE, name=f"tokenmill.{run['pipeline']}")
    flow_run_uuid = _uuid(run_id)

    def dataset(stage: str, fp: str, cls: type, statistics: bool = False):
        art = arts.get((stage, fp))
        name = art["uri"] if art else f"{stage}/{fp}"
        facets = {}
        if art:
            facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
                datasetVersion=art["content_hash"], producer=PRODUCER
            )
        if cls is OutputDataset:
            out_facets = {}
            if statistics and art:
                counts = json.loads(art["counts"] or "{}")
                rows = counts.get("kept", counts.get("tokens"))
                out_facets["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                    rowCount=rows if isinstance(rows, int) else None,
                    size=art["n_bytes"],
                    fileCount=art["n_files"],
                    producer=PRODUCER,
                )
            return OutputDataset(namespace="file", name=name, facets=facets, outputFacets=out_facets)
        return InputDataset(namespace="file", name=name, facets=facets)

    events = [
        RunEvent(
            eventType=RunState.START,
            eventTime=run["started_at"].isoformat(),
            run=Run(runId=flow_run_uuid),
            job=flow_job,
            producer=PRODUCER,
        )
    ]
    for sr in stage_runs:
        stage, fp = sr["stage"], sr["fingerprint"]
        inputs = [
            dataset(e["src_stage"], e["src_fingerprint"], InputDataset)
            for e in edges
            if fp and e["dst_stage"] == stage and e["dst_fingerprint"] == fp
        ]
        if stage == "ingest":
            config = redact_config(json.loads(run["config"]))
            inputs += [InputDataset(namespace="file", name=s["path"]) for s in config.get("sources", [])]
        outputs = [dataset(stage, fp, OutputDataset, statistics=True)] if fp and (stage, fp) in arts else []
        job = Job(
            namespace=NAMESPACE,
            name=f"tokenmill.{stage}",
            facets={
                "sourceCodeLocation": source_code_location_job.SourceCodeLocationJobFacet(
                    type="git",
                    url=PRODUCER,
                    path=STAGE_MODULES.get(stage),
                    version=run["code_version"],
                    producer=PRODUCER,
                )
            },
        )
        parent = parent_run.ParentRunFacet(
            run=parent_run.Run(runId=flow_run_uuid),
            job=parent_run.Job(namespace=NAMESPACE, name=flow_job.name),
            producer=PRODUCER,
        )
        stage_run = Run(runId=_uuid(run_id, stage, str(sr["attempt"])), facets={"parent": parent})
        events.append(
            RunEvent(
                eventType=RunState.START,
                eventTime=sr["started_at"].isoformat(),
                run=stage_run,
                job=job,
                inputs=inputs,
                producer=PRODUCER,
            )
        )
        final = RunState.FAIL if sr["status"] == "failed" else RunState.COMPLETE
        events.append(
            RunEvent(
                eventType=final,
                eventTime=sr["ended_at"].isoformat(),
                run=stage_run,
                job=job,
                inputs=inputs,
                outputs=outputs,
                producer=PRODUCER,
            )
        )
    if run["ended_at"] is not None:
        final = RunState.COMPLETE if run["status"] == "completed" else RunState.FAIL
        events.append(
            RunEvent(
                eventType=final,
                eventTime=run["ended_at"].isoformat(),
                run=Run(runId=flow_run_uuid),
                job=flow_job,
                producer=PRODUCER,
            )
        )
    return events


def export_run(store: LineageStore, run_id: str, target: str | Path) -> int:
    """Emit a run's events to a JSON-lines file or an OpenLineage HTTP endpoint; return how many were sent."""
    client = _client(str(target))
    events = run_events(store, run_id)
    for event in events:
        client.emit(event)
    return len(events)
