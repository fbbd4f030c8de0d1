-- title: Tuned lens vs logit lens (and probes) - identifiability per block
-- Paper: none, beyond the paper (METHOD §7b, experiment 'tuned'): per block, an affine map of the residual
-- stream to the last block's, fitted by ridge regression on the [probe] training split (closed
-- form; not Belrose et al.'s KL-trained translators), then the model's own final norm and head.
-- Beside it the logit lens's rate (experiment 'baseline') and the linear probes' accuracy
-- (experiment 'probe', residual stream), on the same variant, block and token kind.
-- Returns one row per variant x block (0 = embeddings .. L) x token kind ('cls' | 'image').
-- Columns:
--   variant, block, normalised_block (block / L), token_kind, tuned_tokens
--   tuned_id_rate_pct   % of tokens whose true class is the tuned lens's top-1
--   lens_id_rate_pct    % of the logit lens's tokens with rank 0 (null when 'baseline' was not run)
--   probe_acc_pct       % of the residual-stream probes' tokens with rank 0 (null when 'probe' was not run)
WITH tuned_rate AS (
    SELECT variant, block, token_kind, count(*) AS tokens,
           100 * avg((identifiability_rank = 0)::INT) AS rate, max(block) OVER (PARTITION BY variant) AS depth
    FROM tuned WHERE experiment = 'tuned' AND token_kind IN ('cls', 'image')
    GROUP BY variant, block, token_kind
), lens AS (
    SELECT variant, block, token_kind, 100 * sum(identifiable) / sum(tokens) AS rate
    FROM token_summary WHERE experiment = 'baseline' AND stream = 'resid' AND token_kind IN ('cls', 'image')
    GROUP BY variant, block, token_kind
), probe AS (
    SELECT variant, block, token_kind, 100 * avg((probe_rank = 0)::INT) AS rate
    FROM probes WHERE experiment = 'probe' AND stream = 'resid' AND token_kind IN ('cls', 'image')
    GROUP BY variant, block, token_kind
)
SELECT t.variant, t.block, t.block / t.depth AS normalised_block, t.token_kind, t.tokens AS tuned_tokens,
       t.rate AS tuned_id_rate_pct, l.rate AS lens_id_rate_pct, p.rate AS probe_acc_pct
FROM tuned_rate t
LEFT JOIN lens l ON l.variant = t.variant AND l.block = t.block AND l.token_kind = t.token_kind
LEFT JOIN probe p ON p.variant = t.variant AND p.block = t.block AND p.token_kind = t.token_kind
ORDER BY t.variant, t.token_kind, t.block
