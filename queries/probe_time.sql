-- title: Linear probes vs the lens - compute time
-- Paper: Section 8 (the probes cost a training pass and a fit per block, stream and token
-- position; the lens reuses the model's own unembedding and needs no training).
-- Reads runs.experiment_seconds (schema v5; older runs have none and give no rows): JSON
-- {experiment: seconds}, the device-step seconds of each experiment summed over the run's
-- shards and actors, and "probe_fit": the seconds fitting the probes. A value may also be an
-- object {variant: seconds}; then the row is per variant, else variant = 'all' (the run's
-- total over its variants).
-- Returns one row per run x variant with probe seconds ('probe_fit' or 'probe').
-- Columns:
--   run_id, job_name, variant ('all' = the whole run),
--   probe_fit_seconds   seconds fitting the probes (training pass + solve; null if absent)
--   probe_seconds       seconds of the probe experiment on the analysed shards (null if absent)
--   probing_seconds     probe_fit_seconds + probe_seconds (absent parts count 0)
--   lens_seconds        seconds of experiment 'baseline' (the lens; null if not run)
--   probe_lens_ratio    probing_seconds / lens_seconds (null without lens seconds)
WITH runs_json AS (
    SELECT run_id, job_name, started_at,
           CASE WHEN json_valid(experiment_seconds) AND json_type(experiment_seconds) = 'OBJECT'
                THEN experiment_seconds ELSE '{}' END AS js
    FROM (  -- runs written before schema v5 have no such column: it reads as null
        SELECT * FROM runs UNION ALL BY NAME SELECT NULL::VARCHAR AS experiment_seconds WHERE false)
    WHERE experiment_seconds IS NOT NULL
), entries AS (   -- one row per run x key (x variant where the value is an object)
    SELECT r.run_id, r.job_name, r.started_at, e.key AS name, 'all' AS variant,
           TRY_CAST(e.value AS DOUBLE) AS seconds
    FROM runs_json r, json_each(r.js) e
    WHERE json_type(e.value) <> 'OBJECT'
    UNION ALL
    SELECT r.run_id, r.job_name, r.started_at, e.key AS name, v.key AS variant,
           TRY_CAST(v.value AS DOUBLE) AS seconds
    FROM runs_json r, json_each(r.js) e, json_each(e.value) v
    WHERE json_type(e.value) = 'OBJECT'
), per_variant AS (
    SELECT run_id, any_value(job_name) AS job_name, any_value(started_at) AS started_at, variant,
           sum(CASE WHEN name = 'probe_fit' THEN seconds END) AS probe_fit_seconds,
           sum(CASE WHEN name = 'probe' THEN seconds END) AS probe_seconds,
           sum(CASE WHEN name = 'baseline' THEN seconds END) AS lens_seconds
    FROM entries
    GROUP BY run_id, variant
)
SELECT run_id, job_name, variant, probe_fit_seconds, probe_seconds,
       coalesce(probe_fit_seconds, 0) + coalesce(probe_seconds, 0) AS probing_seconds,
       lens_seconds,
       CASE WHEN lens_seconds > 0
            THEN (coalesce(probe_fit_seconds, 0) + coalesce(probe_seconds, 0)) / lens_seconds END
           AS probe_lens_ratio
FROM per_variant
WHERE probe_fit_seconds IS NOT NULL OR probe_seconds IS NOT NULL
ORDER BY started_at, run_id, variant
