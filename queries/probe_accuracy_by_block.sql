-- title: Linear probes vs the lens - accuracy per block and stream
-- Paper: Section 8 / appendix figure (a linear probe trained per block, stream and token
-- position vs the lens's class identifiability of the same block and stream). The probe's
-- accuracy is the share of tokens whose true class is the probe's top-1 (probe_rank = 0),
-- experiment 'probe' (table probes); the lens's rate is the share with identifiability
-- rank 0 in experiment 'baseline' (view token_summary), on the same variant, block, stream
-- and token kind. A result set without probes rows gives no rows.
-- Returns one row per variant x stream x block x token kind ('cls' where the model has one,
-- 'image'; prefix tokens other than CLS excluded).
-- Columns:
--   variant, stream ('resid' | 'attn' | 'mlp'), block (resid: 0 = embeddings .. L; attn/mlp: 1..L),
--   normalised_block   block / L (L = num_blocks of the variants table, else the deepest probed block)
--   token_kind         'cls' | 'image'
--   probe_tokens       tokens with a probe prediction
--   probe_acc_pct      % of those tokens with probe_rank = 0
--   lens_tokens        tokens of the lens (experiment 'baseline'; null when it was not run)
--   lens_id_rate_pct   % of the lens's tokens with identifiability_rank = 0 (null when not run)
WITH depth AS (
    SELECT p.variant, coalesce(max(v.num_blocks), max(p.block)) AS depth
    FROM probes p LEFT JOIN variants v ON v.variant = p.variant
    WHERE p.experiment = 'probe'
    GROUP BY p.variant
), probe AS (
    SELECT variant, stream, block, token_kind,
           count(*) AS tokens,
           100 * avg((probe_rank = 0)::INT) AS acc_pct
    FROM probes
    WHERE experiment = 'probe' AND token_kind IN ('cls', 'image')
    GROUP BY variant, stream, block, token_kind
), lens AS (
    SELECT variant, stream, block, token_kind,
           sum(tokens)::BIGINT AS tokens,
           100 * sum(identifiable) / sum(tokens) AS id_rate_pct
    FROM token_summary
    WHERE experiment = 'baseline' AND token_kind IN ('cls', 'image')
    GROUP BY variant, stream, block, token_kind
)
SELECT p.variant, p.stream, p.block, p.block / d.depth AS normalised_block, p.token_kind,
       p.tokens AS probe_tokens, p.acc_pct AS probe_acc_pct,
       l.tokens AS lens_tokens, l.id_rate_pct AS lens_id_rate_pct
FROM probe p
JOIN depth d ON d.variant = p.variant
LEFT JOIN lens l ON l.variant = p.variant AND l.stream = p.stream AND l.block = p.block
                AND l.token_kind = p.token_kind
ORDER BY p.variant, p.stream, p.token_kind, p.block
