-- title: Images with an identifiable token vs top-1 accuracy vs the random twin
-- Paper: Section 5 text next to Table 1 (% of images with >= 1 identifiable image token in
-- the last block, compared with the model's top-1 accuracy and with random weights).
-- Returns one row per trained variant (names without '@random'), experiment 'baseline'.
-- Columns:
--   variant                               variant name
--   images                                images analysed
--   images_with_id_token_pct              % of images with >= 1 image token of rank 0 in the last block
--   top1_pct                              top-1 accuracy on the same images
--   random_images_with_id_token_pct       the same for the random-weights twin NAME@random (null if not run)
--   random_top1_pct                       the twin's top-1 accuracy (null if not run)
WITH depth AS (
    SELECT variant, max(block) AS depth FROM token_summary WHERE stream = 'resid' GROUP BY variant), per_image AS (
    SELECT t.variant, t.image_key, (sum(t.identifiable) > 0)::INT AS has_identifiable
    FROM token_summary t JOIN depth d ON t.variant = d.variant AND t.block = d.depth
    WHERE t.experiment = 'baseline' AND t.stream = 'resid' AND t.token_kind = 'image'
    GROUP BY t.variant, t.image_key
), per_variant AS (
    SELECT p.variant,
           count(*) AS images,
           100 * avg(p.has_identifiable) AS images_with_id_token_pct,
           100 * avg(i.correct::INT) AS top1_pct
    FROM per_image p
    JOIN images i ON i.variant = p.variant AND i.image_key = p.image_key AND i.experiment = 'baseline'
    GROUP BY p.variant
)
SELECT v.variant, v.images, v.images_with_id_token_pct, v.top1_pct,
       r.images_with_id_token_pct AS random_images_with_id_token_pct,
       r.top1_pct AS random_top1_pct
FROM per_variant v
LEFT JOIN per_variant r ON r.variant = v.variant || '@random'
WHERE v.variant NOT LIKE '%@random'
ORDER BY v.variant
