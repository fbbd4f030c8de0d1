-- title: Heads - the heads that write each class
-- Paper: none, beyond the paper (METHOD §3b, experiment 'heads'): for every image, the (block, head) with the
-- largest direct logit attribution of the true class on the token the head reads (the CLS for
-- CLS models, the mean over image tokens otherwise); per class, how often each head is that
-- top head, and its mean DLA there. Compare a variant with its @random twin.
-- Returns the 3 most frequent top heads per variant x class (ties: larger mean DLA first).
-- Columns:
--   variant, class_index, class_name, block, head
--   images_top      images of the class whose top head this is
--   images          images of the class
--   top_pct         images_top / images, in %
--   mean_dla        this head's mean DLA on the read token over the class's images
WITH read_kind AS (
    SELECT variant, CASE WHEN bool_or(token_kind = 'cls') THEN 'cls' ELSE 'image' END AS kind
    FROM head_summary WHERE experiment = 'heads' GROUP BY variant
), per_image AS (
    SELECT h.variant, h.image_key, h.block, h.head, sum(h.dla_sum) / sum(h.tokens) AS dla
    FROM head_summary h JOIN read_kind r ON r.variant = h.variant AND h.token_kind = r.kind
    WHERE h.experiment = 'heads'
    GROUP BY h.variant, h.image_key, h.block, h.head
), labelled AS (
    SELECT p.*, i.class_index, i.class_name,
           row_number() OVER (PARTITION BY p.variant, p.image_key ORDER BY p.dla DESC, p.block, p.head) AS place
    FROM per_image p
    JOIN (SELECT DISTINCT variant, image_key, class_index, class_name FROM images) i
      ON i.variant = p.variant AND i.image_key = p.image_key
), per_class AS (
    SELECT variant, class_index, any_value(class_name) AS class_name, block, head,
           sum((place = 1)::INT) AS images_top, count(*) AS images, avg(dla) AS mean_dla
    FROM labelled GROUP BY variant, class_index, block, head
), ranked AS (
    SELECT *, row_number() OVER (PARTITION BY variant, class_index ORDER BY images_top DESC, mean_dla DESC) AS r
    FROM per_class
)
SELECT variant, class_index, class_name, block, head, images_top, images,
       100.0 * images_top / images AS top_pct, mean_dla
FROM ranked WHERE r <= 3
ORDER BY variant, class_index, r
