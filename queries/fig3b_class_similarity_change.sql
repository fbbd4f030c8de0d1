-- title: Fig. 3b - class similarity change rate of attention and MLP
-- Paper: Figure 3b (share of tokens whose correct-class logit rises through a sub-layer).
-- A token counts when correct_logit of the sub-layer output exceeds sublayer_input_correct_logit
-- (input = block input for attention, mid-block residual for the MLP). Experiment 'baseline'.
-- Returns one row per variant x block x sub-layer x token kind.
-- Columns:
--   variant, block (1..L), normalised_block (block / L), sublayer ('attn' | 'mlp'),
--   token_kind ('cls' | 'image'), tokens, change_rate_pct
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant
)
SELECT t.variant, t.block, t.block / d.depth AS normalised_block, t.stream AS sublayer, t.token_kind,
       sum(t.tokens)::BIGINT AS tokens,
       100 * sum(t.changed) / sum(t.tokens) AS change_rate_pct
FROM token_summary t JOIN depth d ON t.variant = d.variant
WHERE t.experiment = 'baseline' AND t.stream IN ('attn', 'mlp') AND t.token_kind IN ('cls', 'image')
GROUP BY t.variant, t.block, d.depth, t.stream, t.token_kind
ORDER BY t.variant, sublayer, t.token_kind, t.block
