-- title: Fig. 3c - residual top-1 match with attention, MLP and the previous residual
-- Paper: Figure 3c (whether the top-1 class of the residual stream after block b equals the
-- top-1 class of the attention output, of the MLP output, or of the residual before block b;
-- categories overlap; 'composite' = matches none of the three). Experiment 'baseline'.
-- Returns one row per variant x block (1..L) x token kind.
-- Columns:
--   variant, block, normalised_block (block / L), token_kind ('cls' | 'image'), tokens,
--   attn_pct, mlp_pct, previous_resid_pct, composite_pct   (% of tokens in each category)
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant
)
SELECT x.variant, x.block, x.block / d.depth AS normalised_block, x.token_kind,
       sum(x.tokens)::BIGINT AS tokens,
       100 * sum(x.attn_match) / sum(x.tokens) AS attn_pct,
       100 * sum(x.mlp_match) / sum(x.tokens) AS mlp_pct,
       100 * sum(x.previous_match) / sum(x.tokens) AS previous_resid_pct,
       100 * sum(x.composite) / sum(x.tokens) AS composite_pct
FROM residual_match x JOIN depth d ON x.variant = d.variant
WHERE x.experiment = 'baseline' AND x.token_kind IN ('cls', 'image')
GROUP BY x.variant, x.block, d.depth, x.token_kind
ORDER BY x.variant, x.token_kind, x.block
