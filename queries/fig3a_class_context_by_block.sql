-- title: Fig. 3a - class- vs context-labelled image tokens per block
-- Paper: Figure 3a (class identifiability of class- and context-labelled tokens per block).
-- Returns one row per variant x block (residual stream) x label, experiment 'baseline',
-- image tokens only (labels from the segmentation mask; 'ignore' tokens left out).
-- Columns:
--   variant, block, normalised_block (block / L), label ('class' | 'context'), tokens,
--   mean_score   mean identifiability score 1 - rank / C (null when params were not written)
--   id_rate_pct  % of those tokens with identifiability_rank = 0
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant
), classes AS (
    SELECT variant, count(DISTINCT class_index) AS num_classes FROM params GROUP BY variant
)
SELECT t.variant, t.block, t.block / d.depth AS normalised_block, t.label,
       sum(t.tokens)::BIGINT AS tokens,
       1 - sum(t.rank_sum) / (sum(t.tokens) * c.num_classes) AS mean_score,
       100 * sum(t.identifiable) / sum(t.tokens) AS id_rate_pct
FROM token_summary t
JOIN depth d ON t.variant = d.variant
LEFT JOIN classes c ON t.variant = c.variant
WHERE t.experiment = 'baseline' AND t.stream = 'resid' AND t.token_kind = 'image'
  AND t.label IN ('class', 'context')
GROUP BY t.variant, t.block, d.depth, t.label, c.num_classes
ORDER BY t.variant, t.label, t.block
