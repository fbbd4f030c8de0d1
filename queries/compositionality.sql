-- title: Compositionality of sub-layer predictions
-- Paper: Section 6 (share of tokens whose sub-layer top-1 class matches none of the top-1
-- classes of its top-5 memories, i.e. a prediction composed from several memories).
-- CLS and image tokens pooled; experiment 'baseline'.
-- Returns one row per variant x block (1..L) x sub-layer.
-- Columns:
--   variant, block, normalised_block (block / L), sublayer ('attn' | 'mlp'), tokens, compositional_pct
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant
)
SELECT t.variant, t.block, t.block / d.depth AS normalised_block, t.stream AS sublayer,
       sum(t.tokens)::BIGINT AS tokens,
       100 * (sum(t.tokens) - sum(t.non_compositional)) / sum(t.tokens) AS compositional_pct
FROM token_summary t JOIN depth d ON t.variant = d.variant
WHERE t.experiment = 'baseline' AND t.stream IN ('attn', 'mlp') AND t.token_kind IN ('cls', 'image')
GROUP BY t.variant, t.block, d.depth, t.stream
ORDER BY t.variant, sublayer, t.block
