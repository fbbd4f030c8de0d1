-- title: Key-value agreement per image (input of the correct-vs-misclassified permutation test)
-- Paper: Section 6 (permutation test, 300 permutations of the images' correct/wrong labels).
-- CLS and image tokens pooled; experiment 'baseline'.
-- Returns one row per variant x block x sub-layer x image.
-- Columns: variant, block, sublayer, image_key, correct, agreeing (tokens that agree), tokens
SELECT t.variant, t.block, t.stream AS sublayer, t.image_key, any_value(i.correct) AS correct,
       sum(t.kv_agree)::BIGINT AS agreeing, sum(t.tokens)::BIGINT AS tokens
FROM token_summary t
JOIN images i ON i.variant = t.variant AND i.experiment = t.experiment AND i.image_key = t.image_key
WHERE t.experiment = 'baseline' AND t.stream IN ('attn', 'mlp') AND t.token_kind IN ('cls', 'image')
GROUP BY t.variant, t.block, t.stream, t.image_key
ORDER BY t.variant, sublayer, t.block, t.image_key
