-- title: Fig. 4b - key-value agreement rate per block and sub-layer
-- Paper: Figure 4b (share of tokens whose top-5 memories include one of the correct class's
-- top-5 memories). CLS and image tokens pooled; experiment 'baseline'.
-- Returns one row per variant x block (1..L) x sub-layer.
-- Columns:
--   variant, block, normalised_block (block / L), sublayer ('attn' | 'mlp'), tokens, kv_agreement_pct
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant
)
SELECT t.variant, t.block, t.block / d.depth AS normalised_block, t.stream AS sublayer,
       sum(t.tokens)::BIGINT AS tokens,
       100 * sum(t.kv_agree) / sum(t.tokens) AS kv_agreement_pct
FROM token_summary t JOIN depth d ON t.variant = d.variant
WHERE t.experiment = 'baseline' AND t.stream IN ('attn', 'mlp') AND t.token_kind IN ('cls', 'image')
GROUP BY t.variant, t.block, d.depth, t.stream
ORDER BY t.variant, sublayer, t.block
