"""Write the divergence report of a traced run into one folder (default `reports/<run-name>/`).

Every file is written into a temporary folder beside the destination and renamed into place at the end, so an
interrupted run never leaves a half-written report (an older report of the same name is replaced only once
the new one is complete).

Files
-----
``layers.csv`` (`LAYER_COLUMNS`): one row per paired layer (and per unpaired layer that computes something), in
execution order per tower (vision first, then text).

    tower            vision | text
    order            0-based position of the row within its tower
    block            `stem`, `block1a`…, `pooling` (vision); `embeddings`, `layer_._i`, `pooler`, `projection`
                     (text); the tower's name for the containers around them
    keras_layer      the Keras layer's path, keras_class its class
    hf_module        the HF module's dotted name, hf_class its class
    keras_shape      output shapes as `AxBxC` (each in its own layout: NHWC for Keras, NCHW for torch)
    hf_shape
    max_abs          accumulated error: HF's output vs Keras' output with the whole upstream computed by each
    mean_abs           side (max |Δ|, mean |Δ|, ‖Δ‖/‖keras‖, cosine)
    rel_l2
    cosine
    local_max_abs    local error: the HF module run on the Keras layer's own input (max |Δ|, relative L2);
    local_rel_l2       empty where it cannot be measured
    growth           rel_l2 / the previous row's rel_l2 in the same tower
    reference_sensitivity          the original model against itself on its input moved by float32 round-off
    reference_sensitivity_max_abs    (rel L2, max|Δ|; tracer/engine/sensitivity.py): measured only when an
                     output or a row misses its tolerance and no layer is locally off; empty otherwise
    status           ok | amplified (accumulated error over tolerance, own error within) | diverged (own error
                     over tolerance) | unpaired (a layer without a partner)
    weights          `variable -> parameter; …` for the weights the Keras layer owns
    mapping_source   where those mappings came from: table | inferred | numeric | file (comma separated)
    hint             a likely cause, for diverged rows (tracer/engine/diagnose.py); empty otherwise

``blocks.csv`` (`BLOCK_COLUMNS`): one row per (tower, block), in order of first appearance.

    tower, block
    block_order          0-based position of the block within its tower
    first_order          the first and last layer `order` in the block
    last_order
    layers               number of layer rows in the block
    status               the worst of its rows: diverged > amplified > unpaired > ok
    max_abs, rel_l2      the worst accumulated error among its rows
    local_max_abs        the worst local error among its rows (empty when none was measured)
    local_rel_l2
    diverged, amplified, unpaired   how many of its rows have that status
    first_diverged_keras_layer      the first diverged row in the block (empty when none)
    first_diverged_hf_module
    hint                 the first diverged row's hint, else the first non-empty hint in the block

``mapping.csv`` (`MAPPING_COLUMNS`): every checkpoint variable and the HF parameter it was written to. Readable
back as a `--mapping_file`.

    variable, parameter, transform
    source               table | inferred | numeric | file
    status               confirmed | mismatch | inferred-only | … (tracer/engine/infer.py)
    keras_shape, hf_shape
    keras_checksum       a checksum of the checkpoint tensor and of the tensor written into the HF model, when
    hf_checksum            the transfer computed them (`Entry.keras_checksum` / `Entry.hf_checksum`); else empty
    equals               `tracer.trace(copy_weights=False)`: the Keras weight(s) the torch tensor holds under a
                           layout transform, `name (transform)` joined by `; `, or `none`; else empty
    evidence             for `numeric` entries: the local errors that decided them; else empty
    table_candidate      where the table and the tracer disagree (`mapping.Conflict`): each one's
    table_local_rel_l2     `parameter (transform)` and the paired layer's local rel L2 with its weights on the
    tracer_candidate       recorded input; `winner`: table | tracer | empty (the numbers cannot tell); else empty
    tracer_local_rel_l2
    winner

``summary.json``: the stable contract other tools read (`SUMMARY_KEYS`; floats that are NaN/Inf are null).

    schema_version           1
    checkpoint               the checkpoint path
    verdict                  "match" | "ill-conditioned" | "diverged": "diverged" when any layer row is
                             `diverged`, when either final embedding misses the tolerance (max |Δ| > atol), or
                             when the temperature was not carried over; `amplified` rows alone never make a run
                             diverge. "ill-conditioned" (a match): outputs miss their tolerance, no layer
                             diverged, and every missed output and row over tolerance is within
                             sensitivity.SAME_SIZE of what the original model itself moves by under a one-ulp
                             change of its input (the input's conditioning, not the port)
    verdict_text             the verdict for a person: "match", "match (ill-conditioned input)", "diverged"
    verdict_reasons          the reasons above, as sentences ([] on a match)
    sensitivity              null (not measured), or `sensitivity.Sensitivity.as_dict(rows)`: {"parts": [{"part",
                             "error" (Keras vs HF max|Δ|), "sensitivity" (Keras vs perturbed Keras), "tolerance",
                             "missed", "explained", "ratio"}], "breakdown" (the first row whose
                             reference_sensitivity exceeds the accumulated tolerance), "factor", "perturbation",
                             "rows_measured", "rows_over_tolerance", "rows_unexplained", "first_unexplained"}
    image_embeds_max_abs     max |Δ| of the L2-normalised image / text embeddings
    text_embeds_max_abs
    image_embeds_cosine_min  the smallest per-example cosine similarity of those embeddings
    text_embeds_cosine_min
    temperature              {"checkpoint", "hf", "match"}
    coverage                 {"hf_tensors_written", "hf_tensors_total", "checkpoint_weights_used",
                              "checkpoint_weights_total"} (null when no weights were copied)
    mapping_sources          entries per source; table, inferred, numeric and file are always present
    mapping_statuses         entries per status
    layers                   number of layer rows
    layer_statuses           rows per status; ok, amplified, diverged and unpaired are always present
    first_local_divergence   null or {"tower", "order", "block", "keras_layer", "hf_module", "status", "max_abs",
                             "rel_l2", "local_max_abs", "local_rel_l2", "hint"}: the first row whose own error
                             exceeds the local tolerance (where no local measurement exists: the first row
                             whose status is `diverged`, i.e. a jump in accumulated error)
    first_accumulated_divergence   the same shape: the first row whose accumulated rel_l2 exceeds tolerance
    towers                   {"vision"|"text": {"layers", "layer_statuses", "first_local_divergence",
                              "first_accumulated_divergence", "final_rel_l2"}}
    diverged_blocks          ["vision/stem", …]: blocks whose status is diverged, in order
    tolerances               the run's compare.Tolerances, FLOAT32 or (--float64) FLOAT64 ({"local_rel_l2",
                             "accumulated_rel_l2", "amplified_max_abs", "embeds_max_abs"}, the last being the run's
                             atol) plus "fault_growth"
    hints                    run-level hints (tracer/engine/diagnose.py)
    reference_max_abs        HF vs reference outputs given with the inputs ({} when none)
    set_aside                optimizer / metric variables ignored in the checkpoint
    timings                  seconds per pipeline stage (up to the report)
    spec                     the derived model description (AlignSpec.to_dict())
    files                    the files of the report

``report.html``: the same, for a person; self-contained (inline CSS and SVG, no script, opens from disk).
"""

from tracer.engine.report.schema import (
    BLOCK_COLUMNS, DIVERGENCE_KEYS, FILES, LAYER_COLUMNS, MAPPING_COLUMNS, MAPPING_SOURCES, SCHEMA_VERSION,
    STATUS_RANK, STATUSES, SUMMARY_KEYS, _fmt, _tolerances, block_rows, blocks_frame, default_run_name,
    first_divergences, format_summary, layers_frame, mapping_frame, mapping_rows, summary, verdict, verdict_text,
)
from tracer.engine.report.page import CSS, esc, render_html, short_name, write_report
from tracer.engine.report.plot import divergence_plot

__all__ = [
    "BLOCK_COLUMNS", "DIVERGENCE_KEYS", "FILES", "LAYER_COLUMNS", "MAPPING_COLUMNS", "MAPPING_SOURCES",
    "SCHEMA_VERSION", "STATUS_RANK", "STATUSES", "SUMMARY_KEYS", "_fmt", "_tolerances", "block_rows",
    "blocks_frame", "default_run_name", "first_divergences", "format_summary", "layers_frame", "mapping_frame",
    "mapping_rows", "summary", "verdict", "verdict_text",
    "CSS", "esc", "render_html", "short_name", "write_report",
    "divergence_plot",
]
